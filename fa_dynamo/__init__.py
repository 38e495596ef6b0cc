"""fa_dynamo: ``torch.compile(model, backend="fastattention")``.

Finds the attention in ordinary model code and rewrites it into ``fa_dynamo::attention``,
a tiled FastAttention kernel with a tiling-mask (arXiv 2410.16663).
"""

from fa_dynamo.backend import FastAttentionBackend, fastattention, register
from fa_dynamo.config import FastAttentionConfig, resolve_config
from fa_dynamo.explain import ExplainReport, explain
from fa_dynamo.kernels import attention

register()

__all__ = [
    "ExplainReport", "FastAttentionBackend", "FastAttentionConfig", "attention", "explain", "fastattention", "resolve_config",
]
__version__ = "0.1.0"
