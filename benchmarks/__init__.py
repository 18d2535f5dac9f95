"""Benchmarks of corral against its peers: run ``python -m benchmarks.peers``."""
