"""Recipe: long-context greedy generation with the KV cache kept in host memory.

A transformers decoder normally keeps its KV cache on the device. ``HostKVCache`` keeps every
layer's keys/values in host (CPU) memory instead and hands the attention a copy on the compute
device, inside the compiled graph::

    self.keys = torch.cat([self.keys, key_states.to("cpu")], dim=-2)     # the cache grows on the host
    return self.keys.to(key_states.device), ...                          # copied to the device per step

Compiled with ``backend="fastattention"`` and ``offload`` on (or ``auto`` with a budget), the
offload pass removes that copy: each layer's attention becomes ``fa_dynamo::cooperative_attention``
over the past keys in host memory (host cores on a worker thread, or streamed in bounded blocks)
and the new keys on the device, merged exactly by log-sum-exp. The tokens are those of the
non-offloaded run.

    python examples/offload_generation.py            # a tiny random Llama, offload on vs off

On a machine without an accelerator the "device" is the CPU too; the rewrite, the worker
thread and the merge still run (tests/passes/test_offload.py runs this file's ``generate``).
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class HostKVLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys/values live in host memory."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.keys, self.values = self.keys.to("cpu"), self.values.to("cpu")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states.to("cpu")], dim=-2)
        self.values = torch.cat([self.values, value_states.to("cpu")], dim=-2)
        return self.keys.to(key_states.device), self.values.to(value_states.device)


class HostKVCache(DynamicCache):
    """A ``DynamicCache`` of ``HostKVLayer``s: pass it as ``past_key_values=`` to ``generate``."""

    def __init__(self) -> None:
        super().__init__()
        self.layer_class_to_replicate = HostKVLayer


def generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, backend=None, options: Optional[dict] = None,
             host_cache: bool = True) -> torch.Tensor:
    """Greedy tokens ``[B, max_new_tokens]`` with the KV cache in host memory (``host_cache``).

    ``backend`` (e.g. ``"fastattention"`` with ``options={"offload": "on"}``, or a
    ``FastAttentionBackend``) compiles the model's forward for the call; None runs it eagerly.
    Calling again with the same backend object reuses what was compiled.
    """
    if backend is not None:
        model.forward = torch.compile(model.forward, backend=backend, options=options)
    cache = HostKVCache() if host_cache else DynamicCache()
    # transformers 5 renamed generate's past_key_values= to cache=
    cache_arg = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    try:
        out = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=model.config.pad_token_id, **{cache_arg: cache},
        )
    finally:
        if backend is not None:
            del model.forward  # back to the class's forward
    return out[:, input_ids.shape[1]:]


def tiny_llama(vocab: int = 256, hidden: int = 256, heads: int = 4, kv_heads: int = 2, layers: int = 2,
               max_positions: int = 8192):
    """A random-weight Llama (GQA, eager attention) built from a config: nothing is downloaded."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
        initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=None, attn_implementation="eager",
    )
    return transformers.LlamaForCausalLM(config).eval()


if __name__ == "__main__":
    torch.manual_seed(0)
    model = tiny_llama()
    prompt = torch.randint(3, 256, (1, 2048))
    with torch.no_grad():
        plain = generate(model, prompt, 16, host_cache=False)  # eager, the cache on the device
        offloaded = generate(model, prompt, 16, backend="fastattention", options={"offload": "on", "log": "info"})
    print("offloaded tokens:", offloaded.tolist())
    print("identical to the non-offloaded run:", torch.equal(plain, offloaded))
