"""Configuration: defaults ← env ← options, clear errors, and the entry point in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fa_dynamo.config import FastAttentionConfig, resolve_config


def test_defaults_env_then_options():
    assert resolve_config({}, environ={}) == FastAttentionConfig()
    env = {"FA_DYNAMO_KERNEL": "sdpa", "FA_DYNAMO_BLOCK_Q": "64", "FA_DYNAMO_ATTENTION": "0"}
    cfg = resolve_config({}, environ=env)
    assert (cfg.kernel, cfg.block_q, cfg.attention) == ("sdpa", 64, False)
    cfg = resolve_config({"kernel": "reference", "FA_DYNAMO_BLOCK_Q": 32}, environ=env)
    assert (cfg.kernel, cfg.block_q, cfg.attention) == ("reference", 32, False)


def test_cache_key_tracks_every_field():
    assert FastAttentionConfig().cache_key() == FastAttentionConfig().cache_key()
    assert FastAttentionConfig(block_k=64).cache_key() != FastAttentionConfig().cache_key()


@pytest.mark.parametrize(
    "env, message",
    [
        ({"FA_DYNAMO_KERNEL": "cuda"}, "FA_DYNAMO_KERNEL.*auto, cpu, triton, npu, sdpa, reference, xformers"),
        ({"FA_DYNAMO_INNER": "tvm"}, "FA_DYNAMO_INNER.*inductor, eager"),
        ({"FA_DYNAMO_OFFLOAD": "maybe"}, "FA_DYNAMO_OFFLOAD.*off, auto, on"),
        ({"FA_DYNAMO_LOG": "loud"}, "FA_DYNAMO_LOG"),
        ({"FA_DYNAMO_STRICT": "perhaps"}, "FA_DYNAMO_STRICT.*0 or 1"),
        ({"FA_DYNAMO_BLOCK_Q": "0"}, "FA_DYNAMO_BLOCK_Q.*>= 1"),
        ({"FA_DYNAMO_BLOCK_K": "big"}, "FA_DYNAMO_BLOCK_K.*integer"),
        ({"FA_DYNAMO_KERNL": "cpu"}, "unknown environment variable.*FA_DYNAMO_KERNL"),
        ({"FA_DYNAMO_CPP_DECODE": "no"}, "FA_DYNAMO_CPP_DECODE.*1, 0"),
    ],
)
def test_invalid_values_name_the_variable(env, message):
    with pytest.raises(ValueError, match=message):
        resolve_config({}, environ=env)


def test_process_variables_are_known():
    """``FA_DYNAMO_CPP_DECODE`` is read by the decode kernel, not the config; a compile must accept it."""
    assert resolve_config({}, environ={"FA_DYNAMO_CPP_DECODE": "0"}) == FastAttentionConfig()


def test_unknown_option():
    with pytest.raises(ValueError, match="unknown option 'kernal'"):
        resolve_config({"kernal": "cpu"}, environ={})


def test_options_reach_the_backend():
    def f(q, k, v):
        return torch.softmax(q @ k.mT, -1) @ v

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="fastattention", options={"kernel": "bogus"})
    with pytest.raises(Exception, match="option 'kernel'"):
        compiled(*(torch.randn(1, 2, 8, 4) for _ in range(3)))


_FRESH = textwrap.dedent(
    """
    import sys, torch
    def f(q, k, v):
        s = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
        s = s + torch.triu(torch.full((q.shape[-2], q.shape[-2]), float("-inf")), diagonal=1)
        return torch.softmax(s, dim=-1) @ v
    q, k, v = (torch.randn(1, 4, 300, 64) for _ in range(3))
    g = torch.compile(f, backend="fastattention")
    with torch.profiler.profile() as prof:
        out = g(q, k, v)
    calls = sum(e.count for e in prof.key_averages() if e.key == "fa_dynamo::attention")
    err = (out.double() - f(q.double(), k.double(), v.double())).abs().max().item()
    assert "fa_dynamo" not in sys.argv
    print(calls, err, "fa_dynamo.backend" in sys.modules)
    """
)


@pytest.mark.parametrize("env, fused", [({}, True), ({"FA_DYNAMO_ATTENTION": "0"}, False), ({"FA_DYNAMO_DISABLE": "1"}, False)])
def test_entry_point_in_a_fresh_process(env, fused):
    """``backend="fastattention"`` resolves without ``import fa_dynamo`` (entry point)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FA_DYNAMO_")}
    result = subprocess.run([sys.executable, "-c", _FRESH], env={**clean, **env}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    calls, err, _ = result.stdout.split()
    assert (int(calls) > 0) == fused
    assert float(err) < 1e-4


def test_invalid_env_fails_compile_in_a_fresh_process():
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FA_DYNAMO_")}
    result = subprocess.run([sys.executable, "-c", _FRESH], env={**clean, "FA_DYNAMO_KERNEL": "gpu"},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "FA_DYNAMO_KERNEL" in result.stderr
