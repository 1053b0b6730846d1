"""Benchmarks: ``python bench/bench_<op>.py``; shared harness in ``bench.common``."""
