"""End-to-end: tiny transformers models (eager attention) compiled with the fastattention backend.

Each family (Llama with GQA, GPT-2, BERT) is built from a tiny config with random weights, run
on random ``input_ids`` of an odd length, with and without a padding ``attention_mask``
(left padding for the decoders, right padding for BERT), and compiled with
``FastAttentionBackend({"strict": True, "inner": "eager"})``. The tests check that

* every attention layer became one ``fa_dynamo.attention`` call and no site was refused;
* the outputs equal eager (fp32 tolerances), on the non-padded positions;
* with gradients (train mode, dropout probabilities 0), the parameter gradients equal eager.

These are the spec: a failure here means the pass does not understand the attention that
transformers writes, and the fix belongs in ``fa_dynamo``, not in this file.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fa_dynamo import FastAttentionBackend  # noqa: E402
from fa_dynamo.passes.matching import op_arguments  # noqa: E402

ATTENTION_OP = torch.ops.fa_dynamo.attention.default
SOFTMAXES = (torch.ops.aten.softmax, torch.ops.aten._softmax, torch.ops.aten._safe_softmax)

VOCAB, HIDDEN, HEADS, LAYERS = 128, 64, 4, 2
# Weights 10x the default init scale: with the default (0.02) the scores are ~0.03 and every
# softmax is nearly uniform, so a wrong scale, mask or head mapping would hide under 1e-4.
INIT = 0.2
BATCH, SEQ, PAD = 2, 37, 7  # odd length; row 1 of the batch has PAD padding tokens
FAMILIES = ("llama", "gpt2", "bert")
DECODERS = ("llama", "gpt2")


# --- models ---------------------------------------------------------------------------------


def make_model(family: str, train: bool = False) -> torch.nn.Module:
    """A tiny model with random weights, eager attention, all dropout probabilities 0."""
    common = dict(vocab_size=VOCAB, initializer_range=INIT, attn_implementation="eager")
    if family == "llama":
        config = transformers.LlamaConfig(
            hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, num_key_value_heads=HEADS // 2,  # GQA: 2 query heads per kv head
            max_position_embeddings=128, attention_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            **common,
        )
        assert config.num_key_value_heads < config.num_attention_heads
        model = transformers.LlamaForCausalLM(config)
    elif family == "gpt2":
        config = transformers.GPT2Config(
            n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=128,
            attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0, bos_token_id=1, eos_token_id=2, **common,
        )
        model = transformers.GPT2LMHeadModel(config)
    elif family == "bert":
        config = transformers.BertConfig(
            hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=2 * HIDDEN,
            max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            pad_token_id=0, **common,
        )
        model = transformers.BertModel(config, add_pooling_layer=False)
    else:
        raise ValueError(family)
    assert model.config._attn_implementation == "eager"
    return model.train(train)


def make_inputs(family: str, padded: bool) -> dict:
    """Random ids ``[BATCH, SEQ]``; if ``padded``, row 1 is padded (left for decoders, right for BERT)."""
    ids = torch.randint(3, VOCAB, (BATCH, SEQ))
    if not padded:
        return {"input_ids": ids}
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    if family in DECODERS:
        mask[1, :PAD] = 0
        ids[1, :PAD] = 0
    else:
        mask[1, SEQ - PAD:] = 0
        ids[1, SEQ - PAD:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def main_output(family: str, out) -> torch.Tensor:
    return out.last_hidden_state if family == "bert" else out.logits


def valid_positions(inputs: dict) -> torch.Tensor:
    """Bool ``[BATCH, SEQ]``: the positions whose outputs are meaningful (not padding)."""
    mask = inputs.get("attention_mask")
    ids = inputs["input_ids"]
    return torch.ones(ids.shape, dtype=torch.bool) if mask is None else mask.bool()


# --- compiling and inspecting ---------------------------------------------------------------


def compile_model(model: torch.nn.Module):
    torch._dynamo.reset()
    backend = FastAttentionBackend({"strict": True, "inner": "eager"}, keep_graphs=True)
    return torch.compile(model, backend=backend), backend


def count(gm: torch.fx.GraphModule, *targets) -> int:
    return sum(
        1 for n in gm.graph.nodes
        if n.op == "call_function" and (n.target in targets or getattr(n.target, "overloadpacket", None) in targets)
    )


def assert_all_attention_fused(backend: FastAttentionBackend) -> None:
    """One attention site per layer, each rewritten to one fa_dynamo.attention, none refused."""
    assert backend.graphs, "the backend compiled no graph"
    refused = [(where, why) for reports in backend.reports for rep in reports for where, why in rep.refused]
    errors = [rep.error for reports in backend.reports for rep in reports if rep.error]
    assert not errors, f"a pass failed: {errors}"
    assert not refused, "attention sites refused:\n" + "\n".join(f"  {w}: {y}" for w, y in refused)
    sites = sum(count(before, *SOFTMAXES) for before, _ in backend.graphs)
    fused = sum(count(after, ATTENTION_OP) for _, after in backend.graphs)
    left = sum(count(after, *SOFTMAXES) for _, after in backend.graphs)
    assert sites == LAYERS, f"expected {LAYERS} attention sites (softmaxes) in the graphs, found {sites}"
    assert fused == LAYERS, f"expected {LAYERS} fa_dynamo.attention calls, found {fused}"
    assert left == 0, f"{left} softmax(es) left in the rewritten graphs"
    reported = sum(len(rep.fused) for reports in backend.reports for rep in reports)
    assert reported == LAYERS, f"the reports list {reported} fused sites, expected {LAYERS}"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


# --- inference ------------------------------------------------------------------------------


@pytest.mark.parametrize("padded", [False, True], ids=["nomask", "padded"])
@pytest.mark.parametrize("family", FAMILIES)
def test_inference_matches_eager(family: str, padded: bool) -> None:
    model = make_model(family, train=False)
    inputs = make_inputs(family, padded)
    with torch.no_grad():
        expected = main_output(family, model(**inputs))
        compiled, backend = compile_model(model)
        actual = main_output(family, compiled(**inputs))

    assert_all_attention_fused(backend)
    if family != "bert" and not padded:  # the decoders' causal mask becomes a band, no S×S tensor
        ops = [n for _, after in backend.graphs for n in after.graph.nodes
               if n.target is torch.ops.fa_dynamo.attention.default]
        calls = [op_arguments(op) for op in ops]
        assert all(c["bias"] is None and c["mask"] is None and c["max_offset"] == 0 for c in calls), ops
    keep = valid_positions(inputs)
    assert actual.shape == expected.shape
    assert torch.isfinite(expected[keep]).all()
    torch.testing.assert_close(actual[keep], expected[keep], atol=1e-4, rtol=1e-4)


# --- training -------------------------------------------------------------------------------


def loss_of(family: str, model, inputs: dict) -> torch.Tensor:
    out = main_output(family, model(**inputs))
    keep = valid_positions(inputs).unsqueeze(-1).to(out.dtype)
    if family in DECODERS:  # next-token cross-entropy on the non-padded positions
        logits, labels = out[:, :-1], inputs["input_ids"][:, 1:]
        weight = keep[:, 1:, 0] * keep[:, :-1, 0]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="none")
        return (nll * weight.reshape(-1)).sum() / weight.sum()
    target = torch.linspace(-1, 1, out.shape[-1])
    return (((out - target) ** 2) * keep).sum() / keep.sum()


@pytest.mark.parametrize("padded", [False, True], ids=["nomask", "padded"])
@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_match_eager(family: str, padded: bool) -> None:
    model = make_model(family, train=True)
    inputs = make_inputs(family, padded)

    model.zero_grad(set_to_none=True)
    expected_loss = loss_of(family, model, inputs)
    expected_loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    model.zero_grad(set_to_none=True)
    compiled, backend = compile_model(model)
    actual_loss = loss_of(family, compiled, inputs)
    actual_loss.backward()
    actual = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    assert_all_attention_fused(backend)
    torch.testing.assert_close(actual_loss, expected_loss, atol=1e-5, rtol=1e-4)
    assert actual.keys() == expected.keys()
    # The attention projections' gradients reach eager only through the op's backward.
    assert any("q_proj" in n or "c_attn" in n or "query" in n for n in actual)
    # Relative tolerance 1e-4, against each gradient's own magnitude; the floor (relative to
    # the largest gradient of the model) covers gradients that are zero in exact arithmetic
    # (the key bias: softmax ignores the per-row constant q·b_k, so eager's is rounding noise).
    largest = max(g.abs().max().item() for g in expected.values())
    for name, g in expected.items():
        atol = 1e-4 * max(g.abs().max().item(), 1e-3 * largest)
        torch.testing.assert_close(actual[name], g, rtol=1e-4, atol=atol, msg=lambda m, name=name: f"grad of {name}: {m}")


# --- dynamic shapes -------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_dynamic_sequence_length_fuses_without_recompiling(family: str) -> None:
    """With dynamic=True new sequence lengths reuse the fused graphs.

    (Dynamo itself recompiles these models once on the second call, with any backend — a
    guard on transformers' lazily initialized state — so graphs are counted from then on.)
    """
    torch._dynamo.reset()
    model = make_model(family)
    backend = FastAttentionBackend({"strict": True, "inner": "eager"}, keep_graphs=True)
    compiled = torch.compile(model, backend=backend, dynamic=True)
    graphs = []
    with torch.no_grad():
        for length in (37, 30, 25, 19):
            inputs = {k: v[:, :length] for k, v in make_inputs(family, padded=True).items()}
            expected = main_output(family, model(**inputs))
            actual = main_output(family, compiled(**inputs))
            keep = valid_positions(inputs)
            torch.testing.assert_close(actual[keep], expected[keep], atol=1e-4, rtol=1e-4)
            graphs.append(len(backend.graphs))
    assert graphs[1] == graphs[2] == graphs[3], f"graphs after each call: {graphs}"
    assert all(count(after, ATTENTION_OP) == LAYERS for _, after in backend.graphs)
    assert not [r for reports in backend.reports for rep in reports for r in rep.refused]
