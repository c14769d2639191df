"""Benchmarks for spotlora on a GPU: throughput against the seed recipe, checkpoint timings."""
