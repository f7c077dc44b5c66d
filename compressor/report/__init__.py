"""Reports (JSON + Markdown) and plots of a compression run."""
