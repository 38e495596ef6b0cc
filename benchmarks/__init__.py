"""Benchmarks for fa_dynamo (run as python -m benchmarks <suite>; see --list)."""
