"""The end-to-end suite's models and configurations: what runs, at which size, under which compiler.

``build_runners`` builds one model family once per attention implementation, from the same
weights, and wraps it per configuration (``CONFIGS``) in a ``Runner`` that prefills and decodes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import transformers
from torch._dynamo.utils import counters

from fa_dynamo import FastAttentionBackend

FAMILIES = ("llama", "mistral", "gpt2", "bert")
ENCODERS = ("bert",)
FA_CONFIGS = ("fa_eager", "fa_inductor")
TARGET_VS_EAGER, TARGET_VS_INDUCTOR = 1.3, 1.0


@dataclass(frozen=True)
class Config:
    """How a model is run: its attention implementation and the compiler around it (None: uncompiled)."""

    attn: str
    backend: Optional[str] = None
    options: dict = field(default_factory=dict)
    label: str = ""


CONFIGS = {
    "eager": Config("eager", label="eager attention"),
    "sdpa": Config("sdpa", label="SDPA attention"),
    "inductor": Config("eager", "inductor", label="Inductor (eager attention)"),
    "fa_eager": Config("eager", "fastattention", {"inner": "eager"}, "fastattention, inner eager"),
    "fa_inductor": Config("eager", "fastattention", {"inner": "inductor"}, "fastattention, inner Inductor"),
    "sdpa_inductor": Config("sdpa", "inductor", label="Inductor (SDPA attention)"),
}
DEFAULT_CONFIGS = ("eager", "sdpa", "inductor", "fa_eager", "fa_inductor")
QUICK_MODELS = ("llama", "bert")  # a decoder with GQA and an encoder: --quick stays near 3 minutes


@dataclass(frozen=True)
class Plan:
    """Model size and what to run; ``FULL``, ``QUICK`` and ``TINY`` (the smoke test) below."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    window: int  # Mistral's sliding window, in tokens
    lengths: tuple[int, ...]  # prefill lengths
    decode_prompt: int
    decode_steps: int
    budget_min: float
    repeats: int = 3  # timed prefill calls per configuration (after the first call)

    @property
    def max_positions(self) -> int:
        return max(max(self.lengths), self.decode_prompt + self.decode_steps)


FULL = Plan(512, 4, 8, 2, 32000, 1024, (512, 2048, 8192), 1024, 32, budget_min=28)
QUICK = Plan(256, 2, 4, 2, 32000, 256, (256, 1024), 256, 8, budget_min=6)
TINY = Plan(64, 2, 4, 2, 1000, 96, (64, 128), 64, 2, budget_min=5, repeats=2)


# --- models ------------------------------------------------------------------------------------


def build_model(family: str, plan: Plan, attn: str, seed: int = 0) -> torch.nn.Module:
    """``family`` at ``plan``'s size with ``attn_implementation=attn``; weights from ``seed``."""
    torch.manual_seed(seed)
    h, n = plan.hidden, plan.max_positions
    common = dict(vocab_size=plan.vocab, attn_implementation=attn)
    if family in ("llama", "mistral"):
        kw = dict(
            hidden_size=h, intermediate_size=h * 11 // 4, num_hidden_layers=plan.layers,
            num_attention_heads=plan.heads, num_key_value_heads=plan.kv_heads, max_position_embeddings=n, **common,
        )
        if family == "llama":
            return transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
        return transformers.MistralForCausalLM(transformers.MistralConfig(**kw, sliding_window=plan.window)).eval()
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_embd=h, n_inner=4 * h, n_layer=plan.layers, n_head=plan.heads, n_positions=n, **common)
        return transformers.GPT2LMHeadModel(cfg).eval()
    if family == "bert":
        cfg = transformers.BertConfig(
            hidden_size=h, intermediate_size=4 * h, num_hidden_layers=plan.layers, num_attention_heads=plan.heads,
            max_position_embeddings=n, **common,
        )
        return transformers.BertModel(cfg, add_pooling_layer=False).eval()
    raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")


def graphs_compiled() -> int:
    """Dynamo's count of graphs compiled so far in this process (all backends)."""
    return counters["stats"]["unique_graphs"]


def _mark_cache_dynamic(cache) -> None:
    """Mark the KV cache's sequence dim dynamic so decode steps share one graph."""
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor) and t.dim() >= 2:
                torch._dynamo.maybe_mark_dynamic(t, t.dim() - 2)


class Runner:
    """One model under one configuration: the module, the callable, the fastattention backend."""

    def __init__(self, family: str, config: Config, module: torch.nn.Module):
        self.family, self.config, self.module = family, config, module
        self.backend = FastAttentionBackend(config.options) if config.backend == "fastattention" else None
        if config.backend is None:
            self.fn = module
        else:
            self.fn = torch.compile(module, backend=self.backend or config.backend)

    @property
    def compiled(self) -> bool:
        return self.config.backend is not None

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """One forward pass; decoders: last-token logits [1, V], encoders: hidden states [1, S, H]."""
        if self.compiled:
            torch._dynamo.maybe_mark_dynamic(ids, 1)
        with torch.no_grad():
            if self.family in ENCODERS:
                return self.fn(input_ids=ids).last_hidden_state
            return self.fn(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1]

    def decode(self, prompt: torch.Tensor, steps: int, tokens: Optional[list] = None):
        """Uncompiled prefill of ``prompt``, then ``steps`` one-token calls of ``fn``.

        Feeds ``tokens`` (teacher forcing) or, without them, the greedy choice. Returns the fed
        tokens, the step logits [steps, V] and the seconds of each step.
        """
        fed, logits, times = [], [], []
        with torch.no_grad():
            out = self.module(input_ids=prompt, use_cache=True, logits_to_keep=1)
            cache, nxt = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
            if self.compiled:
                _mark_cache_dynamic(cache)
            for i in range(steps):
                tok = nxt if tokens is None else tokens[i]
                t0 = time.perf_counter()
                out = self.fn(input_ids=tok, cache=cache, use_cache=True)
                times.append(time.perf_counter() - t0)
                cache, nxt = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
                fed.append(tok)
                logits.append(out.logits[:, -1])
        return fed, torch.cat(logits), times

    def fused_sites(self, since: int = 0) -> Optional[dict]:
        """Attention sites fused / found by the attention pass in graphs compiled after report ``since``."""
        if self.backend is None:
            return None
        reps = [r for reports in self.backend.reports[since:] for r in reports if r.name == "attention"]
        return {
            "fused": sum(len(r.fused) for r in reps),
            "candidates": sum(len(r.sites) for r in reps),
            "refused": [f"{w}: {why}" for r in reps for w, why in r.refused],
            "pass_errors": [r.error for r in reps if r.error],
        }


def build_runners(family: str, plan: Plan, configs: tuple[str, ...]) -> dict[str, Runner]:
    eager = build_model(family, plan, "eager")
    modules = {"eager": eager}
    if any(CONFIGS[c].attn == "sdpa" for c in configs):
        modules["sdpa"] = build_model(family, plan, "sdpa")
        modules["sdpa"].load_state_dict(eager.state_dict())
    return {c: Runner(family, CONFIGS[c], modules[CONFIGS[c].attn]) for c in configs}


def token_ids(length: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))

