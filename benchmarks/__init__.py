"""Throughput benchmarks of the stages' steps and the PyTorch reference (not part of the package).

  python -m benchmarks.bench --help      # from the repository root
"""
