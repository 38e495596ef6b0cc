"""Training a transformers model compiled with the backend: the gradients of every parameter equal
the uncompiled model's, the attention backward is the CPU flash backward, and the dropout
contract holds (a site with dropout in training stays unfused, with the reason; in eval it fuses).
"""

from __future__ import annotations

import pytest
import torch
import transformers

from fa_dynamo import FastAttentionBackend
from fa_dynamo.kernels import cpu_backward


def _llama(attn: str, dropout: float = 0.0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   attn_implementation=attn, attention_dropout=dropout)
    return transformers.LlamaForCausalLM(cfg).train()


def _grads(model, fn, ids, mask=None):
    for p in model.parameters():
        p.grad = None
    fn(input_ids=ids, labels=ids, attention_mask=mask).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture
def flash_backward_calls(monkeypatch):
    calls = []
    real = cpu_backward._flash_cpu_backward
    monkeypatch.setattr(cpu_backward, "_flash_cpu_backward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("padded", [False, True])
def test_a_training_step_has_the_uncompiled_gradients(attn, padded, flash_backward_calls):
    torch._dynamo.reset()
    model = _llama(attn)
    ids = torch.randint(0, 256, (2, 200), generator=torch.Generator().manual_seed(1))
    mask = None
    if padded:  # row 1 left-padded: its padding rows see no key (SDPA: zero rows)
        mask = torch.ones_like(ids)
        mask[1, :30] = 0
    expected = _grads(model, model, ids, mask)
    backend = FastAttentionBackend()
    got = _grads(model, torch.compile(model, backend=backend), ids, mask)
    scale = max(g.abs().max().item() for g in expected.values())
    for name, g in expected.items():
        assert (got[name] - g).abs().max().item() < 1e-5 * scale, name
    attention = [r for graph in backend.reports for r in graph if r.name == "attention"]
    assert sum(len(r.fused) for r in attention) == 2
    assert flash_backward_calls, "the attention backward was not the CPU flash backward"


def test_attention_dropout_in_training_stays_unfused_with_its_reason():
    """The contract (README, *Training*): eager's dropout mask cannot be reproduced by another
    kernel, so a site that drops out in training keeps eager's code; in eval mode it fuses."""
    torch._dynamo.reset()
    model = _llama("sdpa", dropout=0.1)
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(2))
    backend = FastAttentionBackend()
    compiled = torch.compile(model, backend=backend)
    compiled(input_ids=ids, labels=ids).loss.backward()
    attention = [r for graph in backend.reports for r in graph if r.name == "attention"]
    assert sum(len(r.fused) for r in attention) == 0
    reasons = [why for r in attention for _, why in r.refused]
    assert len(reasons) == 2 and all("dropout in training mode (p=0.1)" in why for why in reasons)
    model.eval()
    with torch.no_grad():
        out = compiled(input_ids=ids).logits
        torch.testing.assert_close(out, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    attention = [r for graph in backend.reports for r in graph if r.name == "attention"]
    assert sum(len(r.fused) for r in attention) == 2
