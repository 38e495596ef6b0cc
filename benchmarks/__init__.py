"""Benchmarks for fa_dynamo (run as modules: ``python -m benchmarks.bench_attention_cpu``)."""
