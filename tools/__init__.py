"""Benchmarks and reproductions of ctre-edge; run each as ``python -m tools.NAME`` from the repository root."""
