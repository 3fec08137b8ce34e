"""The attention head sizes the attention kernel supports (kernels/attention.py), in a module
that imports no Triton: the backends check a model against it before any kernel is loaded."""

SUPPORTED_HEAD_DIMS = (16, 32, 48, 64)  # the sizes its launch plans are written, compiled and tested for
