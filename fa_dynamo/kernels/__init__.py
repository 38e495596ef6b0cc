"""Custom ops and their device implementations."""

from fa_dynamo.kernels.ops import attention

__all__ = ["attention"]
