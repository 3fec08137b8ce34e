"""Triton kernels for the ViT's two hot sub-blocks, each with its autograd.Function."""
