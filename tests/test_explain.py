"""fa_dynamo.explain and the per-graph log line."""

from __future__ import annotations

import logging

import torch

import fa_dynamo


def two_sites(q, k, v, keep):
    s = q @ k.mT * 0.25
    n = s.shape[-1]
    causal = torch.softmax(s + torch.triu(torch.full((n, n), float("-inf")), 1), -1) @ v
    padded = torch.softmax((q @ k.mT).masked_fill(~keep, float("-inf")), -1) @ v
    other_dim = torch.softmax(q @ k.mT, dim=-2) @ v
    return causal + padded + other_dim


def _inputs():
    q, k, v = (torch.randn(2, 2, 16, 8) for _ in range(3))
    return q, k, v, torch.rand(2, 1, 1, 16) > 0.2


def test_explain_names_every_site_and_the_reason_for_each_refusal():
    torch._dynamo.reset()
    report = fa_dynamo.explain(two_sites, *_inputs())
    assert report.graphs == 1 and len(report.sites) == 3 and report.fused == 2
    by_mask = sorted(s.mask for s in report.sites if s.fused)
    assert by_mask == ["causal", "padding"]
    (refused,) = [s for s in report.sites if not s.fused]
    assert "not over the last dim" in refused.reason and "test_explain.py" in refused.where
    text = str(report)
    assert "2/3 site(s) fused" in text and "not over the last dim" in text


def test_info_log_has_one_summary_line_per_graph(caplog):
    """The records reach the application's handlers (pytest's, at the root logger): propagation is on."""
    torch._dynamo.reset()
    logger = logging.getLogger("fa_dynamo")
    torch.compile(two_sites, backend="fastattention", options={"log": "info", "inner": "eager"})(*_inputs())
    summaries = [r.getMessage() for r in caplog.records if "attention sites" in r.getMessage()]
    assert len(summaries) == 1
    assert summaries[0].startswith("fused 2/3 attention sites (mask: causal 1, padding 1)")
    assert any("not fused at softmax" in r.getMessage() for r in caplog.records)
    assert not any(r.getMessage().startswith("fa_dynamo:") for r in caplog.records), "the formatter names the logger"
    ours = [r for r in caplog.records if r.name.split(".")[0] == "fa_dynamo"]  # torch may log here too
    assert any("attention sites" in r.getMessage() for r in ours) and logger.propagate
