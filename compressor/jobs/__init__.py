"""Whole jobs (compress, search, heal) as the command line and notebooks run them."""
