"""Cross-entropy over a vocabulary projection with one chunked backward (fa_dynamo/lm_head_loss.py):
gradients equal eager's with and without the logits' own gradient, ignored and out-of-range
targets as eager treats them, and the losses it does not serve left to the plain split."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from fa_dynamo import FastAttentionBackend
from fa_dynamo import lm_head_loss

VOCAB, HIDDEN = 4099 + 5000, 48  # more than two backward chunks, the last one partial


class Projected(torch.nn.Module):
    """transformers' causal-LM loss shape: ``cross_entropy(logits.float().view(-1, V), labels)``."""

    def __init__(self, tied=False, bias=False, **loss_kwargs):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        self.mix = torch.nn.Linear(HIDDEN, HIDDEN)
        self.head = torch.nn.Linear(HIDDEN, VOCAB, bias=bias)
        if tied:
            self.head.weight = self.embed.weight
        self.loss_kwargs = loss_kwargs

    def forward(self, ids, labels):
        logits = self.head(torch.tanh(self.mix(self.embed(ids))))
        loss = F.cross_entropy(logits.float().view(-1, VOCAB), labels.view(-1), **self.loss_kwargs)
        return logits, loss


def _labels(shape, seed, ignored=0.25, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, VOCAB, shape, generator=g)
    return labels.masked_fill(torch.rand(shape, generator=g) < ignored, ignore_index)


def _run(fn, model, ids, labels, use_logits):
    for p in model.parameters():
        p.grad = None
    logits, loss = fn(ids, labels)
    (loss + logits.square().mean() if use_logits else loss).backward()
    return logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_as_accurate_as_eager(model, got, ids, labels, use_logits):
    """Each gradient's error against float64 at most twice eager float32's own (plus a float32 ulp)."""
    want = _run(model, model, ids, labels, use_logits)[2]
    reference = _run(model.double(), model, ids, labels, use_logits)[2]
    model.float()
    for name, ref in reference.items():
        eager_err = (want[name].double() - ref).abs().max().item()
        our_err = (got[name].double() - ref).abs().max().item()
        assert our_err <= 2 * eager_err + 1e-7 * ref.abs().max().item(), (name, our_err, eager_err)


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []
    real = lm_head_loss.LMHeadCrossEntropy.backward
    monkeypatch.setattr(lm_head_loss.LMHeadCrossEntropy, "backward",
                        staticmethod(lambda ctx, *g: calls.append([x is None for x in g]) or real(ctx, *g)))
    return calls


@pytest.mark.parametrize("use_logits", [False, True])
@pytest.mark.parametrize("loss_kwargs", [{}, {"reduction": "sum", "ignore_index": 7}])
@pytest.mark.parametrize("tied, bias", [(False, False), (True, False), (True, True)])  # BERT: tied, with a bias
def test_gradients_equal_eager(use_logits, loss_kwargs, tied, bias, fused_calls):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Projected(tied, bias, **loss_kwargs)
    ids = torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(1))
    labels = _labels((2, 33), 2, ignore_index=loss_kwargs.get("ignore_index", -100))
    want = _run(model, model, ids, labels, use_logits)
    got = _run(torch.compile(model, backend=FastAttentionBackend({"strict": True})), model, ids, labels, use_logits)
    torch.testing.assert_close(got[:2], want[:2])
    _assert_as_accurate_as_eager(model, got[2], ids, labels, use_logits)
    assert fused_calls == [[not use_logits, False]], "the fused backward did not run (or got a logits gradient of zeros)"


def test_every_target_ignored_is_nan_loss_and_zero_gradients(fused_calls):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Projected()
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    labels = torch.full((1, 9), -100)
    want = _run(model, model, ids, labels, False)
    got = _run(torch.compile(model, backend=FastAttentionBackend({"strict": True})), model, ids, labels, False)
    assert want[1].isnan() and got[1].isnan()
    torch.testing.assert_close(got[2], want[2])
    assert fused_calls


def test_a_target_out_of_range_raises_as_eager():
    torch._dynamo.reset()
    model = Projected()
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([[1, 2, VOCAB + 3, 4, -100]])
    with pytest.raises(IndexError, match="out of bounds"):
        model(ids, labels)
    with pytest.raises(IndexError, match=f"Target {VOCAB + 3} is out of bounds"):
        torch.compile(model, backend=FastAttentionBackend())(ids, labels)


def test_dynamic_lengths(fused_calls):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Projected()
    backend = FastAttentionBackend({"strict": True})
    compiled = torch.compile(model, backend=backend, dynamic=True)
    for length, seed in ((17, 5), (40, 6), (23, 7)):
        ids = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))
        labels = _labels((2, length), seed)
        _assert_as_accurate_as_eager(model, _run(compiled, model, ids, labels, False)[2], ids, labels, False)
    assert len(fused_calls) == 3 and len(backend.reports) <= 2


@pytest.mark.parametrize("case", ["label_smoothing", "weight", "autocast"])
def test_losses_it_does_not_serve_keep_the_plain_split(case, fused_calls, caplog):
    torch._dynamo.reset()
    torch.manual_seed(0)
    kwargs = {"label_smoothing": {"label_smoothing": 0.1}, "weight": {"weight": torch.rand(VOCAB)}}.get(case, {})
    model = Projected(**kwargs)
    ids = torch.randint(0, VOCAB, (1, 11), generator=torch.Generator().manual_seed(8))
    labels = _labels((1, 11), 9)
    backend = FastAttentionBackend({"strict": True, "log": "debug"})
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"), caplog.at_level(logging.DEBUG, "fa_dynamo"):
        want = _run(model, model, ids, labels, False)
        got = _run(torch.compile(model, backend=backend), model, ids, labels, False)
    torch.testing.assert_close(got[2], want[2], **({"rtol": 2e-2, "atol": 2e-2} if case == "autocast" else {}))
    assert fused_calls == [] and len(backend.loss_cuts) == 1
    assert any("not fused with the vocabulary projection" in r.getMessage() for r in caplog.records)


def test_writing_the_logits_before_backward_is_an_autograd_error(fused_calls):
    """Eager saves log_softmax's output and allows it; the fused loss saves the logits themselves,
    so autograd's saved-tensor check stops the backward (a clear error, never a wrong gradient)."""
    torch._dynamo.reset()
    model = Projected()
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(10))
    logits, loss = torch.compile(model, backend=FastAttentionBackend({"strict": True}))(ids, _labels((1, 7), 11))
    logits.div_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
