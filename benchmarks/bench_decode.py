"""Decode: one generated token's attention and model step, bound by reading the KV cache.

    python -m benchmarks decode            # op 1K-64K (batch 1), 1K-4K (batch 8); model over a 32K cache (~15 min)
    python -m benchmarks decode --quick    # op 4K and 32K; model over an 8K cache (~4 min)
    python -m benchmarks decode --smoke    # tiny sizes: checks the pipeline (the test suite runs it)

* **op**: GQA decode attention with Llama-3-8B's heads (32 query heads over 8 key/value heads
  × 128), one query row, written as transformers' eager attention does it (``repeat_kv``,
  matmul, softmax in float32, matmul) and run uncompiled, compiled by Inductor and by
  fastattention; beside it SDPA with ``enable_gqa=True`` and compiled FlexAttention. Two caches:
  *dynamic* (exactly L keys, no mask) and *static* (2L slots, L filled, the rest hidden by a
  mask: additive ``finfo.min`` for the eager code as transformers builds it, bool for SDPA, a
  block mask for Flex). GB/s counts the K/V bytes of the L filled keys, the least any method
  must read, against the machine's read bandwidth (``timing.read_bandwidth``, a ``sum`` over
  1 GiB). Each call reads its own copy of K/V, rotating over copies larger than the last-level
  cache together, as a model's layers do.
* **model**: a GQA Llama as transformers ships it (SDPA), 2 layers, hidden 1024, 32 query / 8
  key-value heads × 128 (the op's heads, Llama-3-8B's), vocabulary 32000, random weights, fp32, batch 1: one decode step over
  a StaticCache of S slots filled to L (no recompile as L changes), and over a DynamicCache of L
  tokens (sequence dim marked dynamic); uncompiled vs Inductor vs fastattention, tokens/s and
  logits against uncompiled. The caches are filled with random keys/values, not by a prefill.

Results: ``benchmarks/results/decode_cpu.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch._dynamo.utils import counters

from fa_dynamo import FastAttentionBackend
from benchmarks.attention_cpu_methods import eager_attention
from benchmarks.decode_report import markdown, plot
from benchmarks.failures import error_line
from benchmarks.report_writing import command_line, write_report
from benchmarks.timing import CpuLoad, machine_info, measure_interleaved, read_bandwidth

RESULTS = Path(__file__).resolve().parent / "results"
OP_METHODS = ("eager", "sdpa", "flex", "inductor", "fastattention")
MODEL_CONFIGS = ("uncompiled", "inductor", "fastattention")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Plan:
    op_cases: tuple  # (batch, dtype, cache, context)
    heads: tuple  # (query heads, key/value heads, head dim)
    rotate_bytes: int  # K/V copies per case add up to at least this
    model: dict  # LlamaConfig sizes
    static_slots: int
    static_filled: tuple  # fp32, batch 1
    dynamic_lengths: tuple  # fp32, batch 1
    repeats: int
    bandwidth_gib: float
    model_more: tuple = ()  # (cache, filled, batch, dtype): other batches and dtypes


def _op_cases(contexts_b1, contexts_b8, bf16_contexts):
    cases = [(1, "fp32", cache, n) for cache in ("dynamic", "static") for n in contexts_b1
             if cache == "dynamic" or n <= 32768]
    cases += [(8, "fp32", cache, n) for cache in ("dynamic", "static") for n in contexts_b8]
    cases += [(1, "bf16", "dynamic", n) for n in bf16_contexts]
    return tuple(cases)


LLAMA = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=32,
             num_key_value_heads=8, head_dim=128, vocab_size=32000)
FULL = Plan(_op_cases((1024, 4096, 16384, 32768, 65536), (1024, 4096), (4096, 32768)), (32, 8, 128),
            768 << 20, LLAMA, 32768, (1024, 8192, 16384), (1024, 8192, 16384), 7, 1.0,
            (("static", 16384, 1, "bf16"), ("dynamic", 16384, 1, "bf16"), ("static", 4096, 8, "fp32"),
             ("dynamic", 4096, 8, "fp32")))  # grouped by (batch, dtype): each group compiles afresh
QUICK = Plan(_op_cases((4096, 32768), (4096,), (4096,)), (32, 8, 128), 768 << 20, LLAMA, 8192, (4096,), (4096,), 5, 1.0)
SMOKE = Plan(((1, "fp32", "dynamic", 256), (1, "fp32", "static", 256), (2, "bf16", "dynamic", 128)), (4, 2, 16),
             1 << 20, dict(LLAMA, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           vocab_size=256), 512, (100, 300), (100,), 2, 0.05, (("static", 100, 2, "bf16"),))


# --- op ----------------------------------------------------------------------------------------


def _op_inputs(batch, dtype, cache, context, heads, copies, g):
    """``copies`` K/V pairs (each ``[B, Hkv, slots, D]``), one q, and each method's mask."""
    hq, hkv, d = heads
    slots = context if cache == "dynamic" else 2 * context
    q = torch.randn(batch, hq, 1, d, generator=g).to(dtype)
    kv = [tuple(torch.randn(batch, hkv, slots, d, generator=g).to(dtype) for _ in range(2)) for _ in range(copies)]
    masks = {"additive": None, "bool": None, "filled": context}
    if cache == "static":
        unfilled = torch.arange(slots) >= context
        masks["bool"] = ~unfilled.expand(batch, 1, 1, slots)
        masks["additive"] = torch.zeros(batch, 1, 1, slots, dtype=dtype).masked_fill(unfilled, torch.finfo(dtype).min)
    return q, kv, masks


def _op_method(name: str, q, masks, slots: int, batch: int) -> Callable:
    """``fn(k, v)`` computing one decode step's attention by method ``name`` (compiled ones compile on first call)."""
    import torch.nn.functional as F

    if name == "eager":
        return lambda k, v: eager_attention(q, k, v, masks["additive"])
    if name == "sdpa":
        return lambda k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=masks["bool"], enable_gqa=True)
    if name == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        filled = masks["filled"]
        block_mask = None
        if filled < slots:
            block_mask = create_block_mask(lambda b, h, qi, kv: kv < filled, batch, None, 1, slots, device="cpu")
        flex = torch.compile(flex_attention, dynamic=False)
        return lambda k, v: flex(q, k, v, block_mask=block_mask, enable_gqa=True)
    backend = _backend(name)
    compiled = torch.compile(eager_attention, backend=backend, dynamic=False)
    fn = lambda k, v: compiled(q, k, v, masks["additive"])  # noqa: E731
    fn.backend = backend
    return fn


def _backend(name: str):
    """``name``, or for fastattention a backend object whose reports say what it fused."""
    return FastAttentionBackend() if name == "fastattention" else name


def _fused(backend) -> Optional[str]:
    """``fused/found`` attention sites over the graphs ``backend`` compiled (None for other backends)."""
    if not isinstance(backend, FastAttentionBackend):
        return None
    reports = [r for graph in backend.reports for r in graph if r.name == "attention"]
    return f"{sum(len(r.fused) for r in reports)}/{sum(len(r.sites) for r in reports)}"


def bench_op(plan: Plan, bandwidth_gbps: float) -> list[dict]:
    rows = []
    for batch, dtype_name, cache, context in plan.op_cases:
        dtype = DTYPES[dtype_name]
        hq, hkv, d = plan.heads
        kv_bytes = 2 * batch * hkv * context * d * dtype.itemsize  # the filled keys and values
        slots = context if cache == "dynamic" else 2 * context
        copies = max(1, math.ceil(plan.rotate_bytes / (kv_bytes * slots / context)))
        g = torch.Generator().manual_seed(context + batch)
        q, kv, masks = _op_inputs(batch, dtype, cache, context, plan.heads, copies, g)
        torch._dynamo.reset()
        row = {"batch": batch, "dtype": dtype_name, "cache": cache, "context": context, "slots": slots,
               "kv_bytes": kv_bytes, "copies": copies, "methods": {}}
        fns = {}
        with torch.no_grad():
            k0, v0 = kv[0]
            expected = eager_attention(q.double(), k0.double(), v0.double(),
                                       None if masks["additive"] is None else masks["additive"].double())
            for name in OP_METHODS:
                try:
                    fn = _op_method(name, q, masks, slots, batch)
                    t0 = time.perf_counter()
                    out = fn(k0, v0)
                    row["methods"][name] = {"first_call_s": time.perf_counter() - t0,
                                            "max_abs_err": (out.double() - expected).abs().max().item(),
                                            "fused": _fused(getattr(fn, "backend", None))}
                    turn = iter(range(1 << 62))
                    fns[name] = (lambda f=fn, t=turn, kv=kv, n=copies: f(*kv[next(t) % n]))
                except Exception as e:  # recorded in the table, the rest still runs
                    row["methods"][name] = {"error": error_line(e)}
            timings = measure_interleaved(fns, warmup=1, repeats=plan.repeats)
        for name, t in timings.items():
            row["methods"][name].update(median_s=t.median, samples_s=t.samples, gbps=kv_bytes / t.median / 1e9,
                                        of_bandwidth=kv_bytes / t.median / 1e9 / bandwidth_gbps)
        if "sdpa" in timings:
            for name, t in timings.items():
                row["methods"][name]["vs_sdpa"] = timings["sdpa"].median / t.median
        rows.append(row)
        print(f"op B={batch} {dtype_name} {cache} {context}: " + ", ".join(
            f"{n} {t.median * 1e3:.1f} ms" for n, t in timings.items()), file=sys.stderr, flush=True)
        del kv, fns
    return rows


# --- model -------------------------------------------------------------------------------------


def _llama(sizes: dict, max_positions: int):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**sizes, max_position_embeddings=max_positions, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(cfg).eval(), cfg


def _static_cache(cfg, slots: int, g: torch.Generator, batch: int, dtype: torch.dtype):
    from transformers import StaticCache

    cache = StaticCache(config=cfg, max_cache_len=slots)
    cache.early_initialization(batch, cfg.num_key_value_heads, cfg.head_dim, dtype, torch.device("cpu"))
    for layer in cache.layers:
        layer.keys.normal_(generator=g)  # unfilled slots too: any values, hidden by the mask
        layer.values.normal_(generator=g)
    return cache


def _dynamic_cache(cfg, length: int, g: torch.Generator, batch: int, dtype: torch.dtype):
    from transformers import DynamicCache

    cache = DynamicCache(config=cfg)
    shape = (batch, cfg.num_key_value_heads, length, cfg.head_dim)
    for i in range(cfg.num_hidden_layers):
        cache.update(torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype), i)
    return cache


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _step_fn(fn, cache, length: int, kind: str, ids):
    """One decode step at position ``length``, the cache first put back to ``length`` tokens."""
    pos = torch.full((ids.shape[0], 1), length)

    def step():
        if kind == "static":
            for layer in cache.layers:
                layer.cumulative_length.fill_(length)
        else:
            extra = cache.get_seq_length() - length
            if extra:
                cache.crop(-extra)  # transformers 5: a negative count of tokens to remove
            for layer in cache.layers:  # one graph for every length, as generation needs
                torch._dynamo.maybe_mark_dynamic(layer.keys, 2)
                torch._dynamo.maybe_mark_dynamic(layer.values, 2)
        return fn(input_ids=ids, position_ids=pos, cache=cache, use_cache=True).logits[:, -1]

    return step


def bench_model(plan: Plan) -> list[dict]:
    model, cfg = _llama(plan.model, max(plan.static_slots, max(plan.dynamic_lengths) + 8))
    rows = []
    cases = [("static", n, 1, "fp32") for n in plan.static_filled] + [("dynamic", n, 1, "fp32")
                                                                       for n in plan.dynamic_lengths]
    group = None
    for kind, length, batch, dtype_name in [*cases, *plan.model_more]:
        dtype = DTYPES[dtype_name]
        if (batch, dtype_name) != group:  # fresh compiles: the models share one code object's cache
            group = (batch, dtype_name)
            torch._dynamo.reset()
            typed = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
            backends = {c: _backend(c) for c in MODEL_CONFIGS if c != "uncompiled"}
            compiled = {"uncompiled": typed, **{c: torch.compile(typed, backend=b, dynamic=False)
                                                for c, b in backends.items()}}
        ids = torch.randint(0, cfg.vocab_size, (batch, 1), generator=torch.Generator().manual_seed(0))
        g = torch.Generator().manual_seed(length)
        cache = (_static_cache(cfg, plan.static_slots, g, batch, dtype) if kind == "static"
                 else _dynamic_cache(cfg, length, g, batch, dtype))
        row = {"cache": kind, "filled": length, "slots": plan.static_slots if kind == "static" else length,
               "batch": batch, "dtype": dtype_name, "configs": {}}
        fns = {}
        with torch.no_grad():
            expected = _step_fn(compiled["uncompiled"], cache, length, kind, ids)()
            for config, fn in compiled.items():
                step = _step_fn(fn, cache, length, kind, ids)
                before = _graphs()
                t0 = time.perf_counter()
                out = step()
                first = time.perf_counter() - t0
                compiled_now = _graphs() - before
                for _ in range(2):
                    step()
                row["configs"][config] = {"first_call_s": first, "graphs_compiled_first_call": compiled_now,
                                          "graphs_compiled_after": _graphs() - before - compiled_now,
                                          "max_abs_diff_logits": (out - expected).abs().max().item()}
                fns[config] = step
            timings = measure_interleaved(fns, warmup=1, repeats=plan.repeats)
        row["fused"] = _fused(backends["fastattention"])
        for config, t in timings.items():
            row["configs"][config].update(median_s=t.median, samples_s=t.samples, tokens_per_s=batch / t.median,
                                          vs_uncompiled=timings["uncompiled"].median / t.median)
        rows.append(row)
        print(f"model {kind} {length} B={batch} {dtype_name}: " + ", ".join(f"{c} {t.median * 1e3:.1f} ms" for c, t in timings.items()),
              file=sys.stderr, flush=True)
    return rows


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="op at 4K and 32K; model over an 8K cache")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, to check the pipeline")
    p.add_argument("--out", type=Path, default=RESULTS / "decode_cpu", help="output path without extension")
    args = p.parse_args(argv)
    plan = SMOKE if args.smoke else QUICK if args.quick else FULL
    with CpuLoad() as load:
        bandwidth = read_bandwidth(plan.bandwidth_gib)
        print(f"read bandwidth {bandwidth['gbps']:.1f} GB/s", file=sys.stderr, flush=True)
        op = bench_op(plan, bandwidth["gbps"])
        model = bench_model(plan)
    report = {"machine": machine_info(), "command": command_line("python -m benchmarks decode",
                                                                 sys.argv[1:] if argv is None else argv),
              "heads": plan.heads, "model_sizes": plan.model, "static_slots": plan.static_slots,
              "repeats": plan.repeats, "read_bandwidth": bandwidth, "op": op, "model": model, "load": load.as_dict()}
    write_report(args.out, report, markdown(report))
    plot(report, args.out.with_suffix(".png"))
    print(f"→ {args.out}.md", flush=True)


if __name__ == "__main__":
    main()
