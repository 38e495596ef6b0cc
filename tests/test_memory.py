"""Memory: long prefill through a real transformers layer allocates no Sq×Sk tensor."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("transformers")

_PREFILL = textwrap.dedent(
    """
    import resource, sys, torch
    from transformers import LlamaConfig, LlamaModel
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=32768,
                      attn_implementation="eager")
    model = LlamaModel(cfg).eval()
    seq = int(sys.argv[1])
    ids = torch.randint(0, 128, (1, seq))
    mask = torch.ones(1, seq, dtype=torch.long)
    mask[0, :7] = 0  # left padding: the mask is causal AND key padding
    compiled = torch.compile(model, backend="fastattention", options={"inner": "eager"})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        out = compiled(input_ids=ids, attention_mask=mask).last_hidden_state
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    print(grown, bool(torch.isfinite(out[0, 7:]).all()))
    """
)


def test_llama_16k_prefill_grows_less_than_one_dense_mask():
    seq = 16384
    dense_mask_bytes = seq * seq * 4  # one fp32 [1, 1, S, S] additive mask: 1 GiB
    env = {k: v for k, v in os.environ.items() if not k.startswith("FA_DYNAMO_")}
    result = subprocess.run([sys.executable, "-c", _PREFILL, str(seq)], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    grown, finite = result.stdout.split()
    assert finite == "True"
    assert int(grown) < dense_mask_bytes / 2, f"peak RSS grew {int(grown) / 2**20:.0f} MiB"
