"""The recipe search: low rank x precision candidates under size / fidelity / latency constraints."""
