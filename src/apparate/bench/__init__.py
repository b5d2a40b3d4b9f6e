"""Benchmarks and experiments. Each prints a table whose comparisons are measured side by side
in one run (interleaved, medians), and the command that reproduces it."""
