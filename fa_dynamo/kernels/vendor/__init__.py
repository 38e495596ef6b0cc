"""Dispatch to vendor kernels: torch_npu's fused attention (``npu``) and xformers' memory-efficient
attention (``xformers``), each falling back, said once, on what it cannot serve."""
