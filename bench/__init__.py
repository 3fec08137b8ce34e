"""Benchmarks of the Triton kernels and of end-to-end CIFAR-10 training.

`python -m bench` runs everything and writes bench/results/<date>-<device>-<commit>/;
see bench/README.md. `pytest bench` runs the pytest-benchmark entry points of the
kernels. Nothing here is imported by the model or the trainer.
"""
