"""Feeding models: one inputs module (batches, mappings, devices, compared outputs), calibration
statistics and the readers of calibration files."""
