"""Fused kernels for the DiT block's memory-bound ops, each beside its pure-torch reference.

Imports only torch (and triton, where kernels exist). ``streamgen_kernels.ops`` is the one place the model calls.
"""
