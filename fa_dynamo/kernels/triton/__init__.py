"""The Triton kernels (CUDA/ROCm, or the interpreter on CPU): the forward (``forward``), the
backward (``backward``) and the per-architecture tile configs (``configs``). Imported on demand:
``fa_dynamo`` itself does not need Triton."""
