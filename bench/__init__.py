"""HydraAI's performance benchmarks: run them with `python -m bench`."""
