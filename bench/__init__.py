"""Benchmarks of the connectors service against floors measured in the same run (`bench/run`, BENCHMARKS.md)."""
