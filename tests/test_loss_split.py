"""The loss compiled apart from the output it reads (fa_dynamo/loss_split.py): gradients equal
eager's, the output's unused gradient is never filled with zeros, and model compute downstream of
an output is not cut off."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from fa_dynamo import FastAttentionBackend

VOCAB, HIDDEN = 97, 24


class TinyLM(torch.nn.Module):
    """Attention, a vocabulary projection, and the loss on its logits, returned with them."""

    def __init__(self, vocab=VOCAB, hidden=HIDDEN):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.qkv = torch.nn.Linear(hidden, 3 * hidden)
        self.head = torch.nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids, labels):
        h = self.embed(ids)
        q, k, v = self.qkv(h).unflatten(-1, (3, 2, h.shape[-1] // 2)).permute(2, 0, 3, 1, 4)
        h = h + F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)
        logits = self.head(h)
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return logits, loss


def _step(fn, model, ids, labels, use_logits=False):
    for p in model.parameters():
        p.grad = None
    logits, loss = fn(ids, labels)
    (loss + logits.square().mean() if use_logits else loss).backward()
    return logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _inputs(length, seed, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, length), generator=g)
    labels = ids.masked_fill(torch.rand(ids.shape, generator=g) < 0.2, -100)
    return ids, labels


@pytest.mark.parametrize("use_logits", [False, True])
def test_gradients_equal_eager(use_logits):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyLM()
    backend = FastAttentionBackend({"strict": True})
    compiled = torch.compile(model, backend=backend)
    ids, labels = _inputs(37, 1)
    want = _step(model, model, ids, labels, use_logits)
    got = _step(compiled, model, ids, labels, use_logits)
    torch.testing.assert_close(got[:2], want[:2])
    torch.testing.assert_close(got[2], want[2])
    assert len(backend.loss_cuts) == 1 and len(backend.loss_cuts[0]) == 1, backend.loss_cuts


def _zero_fills_of(shape, fn):
    """How many ops filled a tensor of ``shape`` while ``fn`` ran (a zero gradient is one)."""
    with profile(record_shapes=True) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name in ("aten::fill_", "aten::zero_", "aten::zeros_like")
               and e.input_shapes and list(e.input_shapes[0]) == list(shape))


@pytest.mark.parametrize("split", [True, False])
def test_the_logits_get_no_zero_gradient(split):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyLM()
    compiled = torch.compile(model, backend=FastAttentionBackend({"split_loss": split}))
    ids, labels = _inputs(41, 2)
    _step(compiled, model, ids, labels)
    fills = _zero_fills_of((2, 41, VOCAB), lambda: _step(compiled, model, ids, labels))
    assert (fills == 0) if split else (fills >= 1), fills  # unsplit: autograd's zeros for the logits


def test_dynamic_lengths_compile_once():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyLM()
    backend = FastAttentionBackend({"strict": True})
    compiled = torch.compile(model, backend=backend, dynamic=True)
    graphs = []
    for length, seed in ((29, 3), (53, 4), (71, 5), (12, 6)):
        ids, labels = _inputs(length, seed)
        want = _step(model, model, ids, labels)
        got = _step(compiled, model, ids, labels)
        torch.testing.assert_close(got[2], want[2])
        graphs.append(len(backend.reports))
    assert graphs[1] == graphs[-1], f"graphs compiled after each length: {graphs}"
    assert backend.loss_cuts  # (the first compile may be retraced by Dynamo: a graph it abandons has no cut)


def test_model_compute_below_an_output_is_not_cut():
    """A K/V-cache-like output that a later layer reads (through a weight) is not a loss."""

    class ReturnsK(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.k = torch.nn.Linear(HIDDEN, HIDDEN)
            self.out = torch.nn.Linear(HIDDEN, HIDDEN)

        def forward(self, x):
            k = self.k(x)
            return k, self.out(torch.softmax(x @ k.mT, -1) @ x).sum()

    torch._dynamo.reset()
    model = ReturnsK()
    backend = FastAttentionBackend({"strict": True})
    x = torch.randn(2, 9, HIDDEN)
    k, total = torch.compile(model, backend=backend)(x)
    total.backward()
    assert backend.loss_cuts == []
    want_k, want_total = model(x)
    torch.testing.assert_close((k, total), (want_k, want_total))


def test_no_cut_without_grad():
    torch._dynamo.reset()
    model = TinyLM()
    backend = FastAttentionBackend({"strict": True})
    ids, labels = _inputs(17, 5)
    with torch.no_grad():
        got = torch.compile(model, backend=backend)(ids, labels)
        torch.testing.assert_close(got, model(ids, labels))
    assert backend.loss_cuts == []


class LossThenState(TinyLM):
    """A loss followed, in the model, by what must stay after it: a write it reads, a grad-mode
    switch, or a random op in the loss itself."""

    def __init__(self, case):
        super().__init__()
        self.case = case
        self.register_buffer("scale", torch.tensor(1.5))

    def forward(self, ids, labels):
        logits, loss = super().forward(ids, labels)
        if self.case == "write":
            loss = loss + self.scale  # eager reads 1.5; the model part's write must not come first
            self.scale.mul_(2)
        elif self.case == "no_grad":
            with torch.no_grad():
                spread = logits.detach().std()
            loss = loss + 0 * spread
        elif self.case == "random":
            loss = loss + F.dropout(logits, 0.5).mean()
        return logits, loss


@pytest.mark.parametrize("case", ["write", "no_grad", "random"])
def test_no_cut_where_the_loss_would_change_order(case):
    torch._dynamo.reset()
    ids, labels = _inputs(19, 7)
    torch.manual_seed(0)
    model = LossThenState(case)
    torch.manual_seed(1)
    want = _step(model, model, ids, labels)
    model.scale.fill_(1.5)
    backend = FastAttentionBackend({"strict": True})
    torch.manual_seed(1)
    got = _step(torch.compile(model, backend=backend), model, ids, labels)
    if case != "random":  # compiled dropout draws other numbers than eager's
        torch.testing.assert_close(got[:2], want[:2])
        torch.testing.assert_close(got[2], want[2])
    assert backend.loss_cuts == []


def test_a_failing_split_compiles_the_graph_whole(monkeypatch, caplog):
    import fa_dynamo.backend

    def broken(*args, **kwargs):
        raise ValueError("split broke")

    monkeypatch.setattr(fa_dynamo.backend, "compile_split", broken)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyLM()
    backend = FastAttentionBackend()
    ids, labels = _inputs(21, 8)
    want = _step(model, model, ids, labels)
    with caplog.at_level("WARNING", "fa_dynamo"):
        got = _step(torch.compile(model, backend=backend), model, ids, labels)
    torch.testing.assert_close(got, want)
    assert backend.loss_cuts == []
    assert any("could not compile the loss apart (ValueError: split broke)" in r.getMessage() for r in caplog.records)
