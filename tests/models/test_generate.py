"""The generation recipe: ``model.forward = torch.compile(model.forward, backend="fastattention")``,
then ``model.generate``, with a static cache and with the default dynamic cache.

Greedy decoding must give the uncompiled model's tokens, every attention site of the decode step
must be fused, and a second ``generate`` (another prompt of the same length, more new tokens)
must compile nothing: no graph per step.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from torch._dynamo.utils import counters

from fa_dynamo import FastAttentionBackend

PROMPT, NEW_TOKENS = 12, 6


def _llama(attn: str) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   attn_implementation=attn)
    return transformers.LlamaForCausalLM(cfg).eval()


def _generate(model, ids, cache: str, new_tokens: int):
    kw = {"cache_implementation": "static"} if cache == "static" else {}
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, pad_token_id=0, **kw)
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("cache", ["static", "dynamic"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generate_gives_the_uncompiled_tokens_without_recompiling(cache, attn):
    torch._dynamo.reset()
    model = _llama(attn)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 512, (1, PROMPT), generator=g) for _ in range(2)]
    expected = [_generate(model, ids, cache, n) for ids, n in zip(prompts, (NEW_TOKENS, NEW_TOKENS + 3))]

    backend = FastAttentionBackend()
    model.forward = torch.compile(model.forward, backend=backend)
    with torch.no_grad():
        first = _generate(model, prompts[0], cache, NEW_TOKENS)
        graphs = counters["stats"]["unique_graphs"]
        second = _generate(model, prompts[1], cache, NEW_TOKENS + 3)
    for (tokens, scores), (want_tokens, want_scores) in zip((first, second), expected):
        assert torch.equal(tokens, want_tokens)
        torch.testing.assert_close(scores, want_scores, atol=1e-4, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == graphs, "the second generate compiled again"
    attention = [r for graph in backend.reports for r in graph if r.name == "attention"]
    assert attention and all(len(r.fused) == len(r.sites) == 2 for r in attention), \
        [(len(r.fused), len(r.sites), r.refused) for r in attention]
