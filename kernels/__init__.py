"""Triton kernels for the ViT's transformer block: four fused ops (layernorm_linear, attention,
linear_residual, layernorm_mlp), each a pair of PyTorch operators with fake and autograd
registrations; cost.py, specs.py, h100.py and report.py analyse them from their launch plans."""
