"""Benchmark of the front worker + Redis against a bare ZeroMQ echo server.

Run it with `python -m benchmarks.run` (add `--quick` for a smoke run); it
writes docs/benchmarks.md, docs/benchmarks.png and benchmarks/results/*.json.
"""
