"""The models as transformers ships them (``attn_implementation="sdpa"``): prefill time and peak
memory, uncompiled against Inductor and fastattention, all measured in one run.

    python -m benchmarks sdpa              # Mistral prefill at 4K, 8K, 16K; padded Llama memory at 16K (~15 min)
    python -m benchmarks sdpa --quick      # 2K and 4K; memory at 4K (~3 min)
    python -m benchmarks sdpa --smoke      # tiny sizes: checks the pipeline (the test suite runs it)

* **time**: a Mistral (sliding window 1024, GQA 8 query / 2 key-value heads × 64, hidden 512,
  MLP 1408, 2 layers, vocabulary 32000, random weights, fp32, batch 1) prefills L tokens
  (``use_cache=False, logits_to_keep=1``, as generation's prefill does). Under ``torch.compile``
  transformers hands SDPA a materialized ``[B, 1, L, L]`` bool mask for the window, which SDPA's
  CPU kernel turns into a float mask and computes in full; the backend lifts it into a band and
  skips the tiles outside the window. Medians of interleaved rounds (``measure_interleaved``),
  the first (compiling) call excluded and reported as compile time; logits compared with the
  uncompiled model's.
* **memory**: a one-layer Llama prefill of L tokens with a left-padded batch row (the padding mask
  transformers builds), peak RSS growth of the call in a forked child (``peak_memory.run_forked``)
  after a compiling call at a short length with the sequence dim marked dynamic.

Results: ``benchmarks/results/sdpa_models_cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from benchmarks.peak_memory import maxrss_mib, reset_peak, rss_mib, run_forked
from benchmarks.report_writing import command_line, machine_lines, or_dash, write_report
from benchmarks.timing import CpuLoad, machine_info, measure_interleaved

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = ("uncompiled", "inductor", "fastattention")
WINDOW = 1024


def _model(family: str, layers: int, hidden: int, heads: int, window: int, vocab: int) -> torch.nn.Module:
    import transformers

    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), max_position_embeddings=1 << 17,
              attn_implementation="sdpa")
    torch.manual_seed(0)
    if family == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**kw, sliding_window=window)).eval()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()


def _compiled(model, config: str):
    return model if config == "uncompiled" else torch.compile(model, backend=config, dynamic=False)


def _inputs(length: int, vocab: int, padded: bool) -> dict:
    ids = torch.randint(0, vocab, (2 if padded else 1, length), generator=torch.Generator().manual_seed(length))
    inputs = {"input_ids": ids, "use_cache": False, "logits_to_keep": 1}
    if padded:
        mask = torch.ones_like(ids)
        mask[1, : length // 10] = 0  # row 1 left-padded by 10%
        inputs["attention_mask"] = mask
    return inputs


def bench_time(lengths: list[int], size: dict, repeats: int) -> list[dict]:
    model = _model("mistral", **size)
    rows = []
    for length in lengths:
        torch._dynamo.reset()  # each configuration compiles once per length, the first call excluded
        inputs = _inputs(length, size["vocab"], padded=False)
        with torch.no_grad():
            expected = model(**inputs).logits
            fns, first, diffs = {}, {}, {}
            for config in CONFIGS:
                fn = _compiled(model, config)
                t0 = time.perf_counter()
                out = fn(**inputs).logits
                first[config] = time.perf_counter() - t0
                diffs[config] = (out - expected).abs().max().item()
                fns[config] = (lambda f=fn: f(**inputs))
            timings = measure_interleaved(fns, warmup=0, repeats=repeats)
        row = {"length": length, "configs": {}}
        for config in CONFIGS:
            median = timings[config].median
            row["configs"][config] = {
                "median_s": median, "samples_s": timings[config].samples, "first_call_s": first[config],
                "compile_s": max(0.0, first[config] - median), "max_abs_diff_logits": diffs[config],
                "speedup_vs_uncompiled": timings["uncompiled"].median / median,
            }
        rows.append(row)
        print(f"mistral prefill {length}: " + ", ".join(
            f"{c} {row['configs'][c]['median_s']:.2f} s" for c in CONFIGS), file=sys.stderr, flush=True)
    return rows


def _peak_child(config: str, length: int, warm_length: int, size: dict) -> dict:
    model = _model("llama", **size)
    fn = _compiled(model, config)
    with torch.no_grad():
        warm = _inputs(warm_length, size["vocab"], padded=True)
        for t in (warm["input_ids"], warm["attention_mask"]):
            torch._dynamo.mark_dynamic(t, 1)
        fn(**warm)  # compiles (dynamic sequence length), so the measured call does not
        inputs = _inputs(length, size["vocab"], padded=True)
        for t in (inputs["input_ids"], inputs["attention_mask"]):
            torch._dynamo.mark_dynamic(t, 1)
        before = rss_mib()
        reset_peak()
        t0 = time.perf_counter()
        fn(**inputs)
        seconds = time.perf_counter() - t0
    return {"peak_growth_mib": maxrss_mib() - before, "call_s": seconds}


def bench_memory(length: int, warm_length: int, size: dict) -> dict:
    return {config: run_forked(_peak_child, config, length, warm_length, size) for config in CONFIGS}


def markdown(report: dict) -> str:
    size, mem = report["size"], report["memory"]
    out = ["# The models as transformers ships them (SDPA): uncompiled vs Inductor vs fastattention", ""]
    out += machine_lines(report["machine"])
    out += [f"- **Command**: `{report['command']}`; {report['load']['wall_s']:.0f} s, other processes kept "
            f"{report['load']['other_processes_cores_avg'] or 0:.2f} cores busy on average", "",
            f"Mistral (sliding window {size['window']}), {size['layers']} layers, hidden {size['hidden']}, "
            f"{size['heads']} heads × {size['hidden'] // size['heads']} ({max(1, size['heads'] // 4)} key/value heads), "
            f"random weights, fp32, batch 1, prefill with `use_cache=False, logits_to_keep=1`; medians of "
            f"{report['repeats']} interleaved rounds.", "",
            "| tokens | uncompiled (SDPA) | Inductor | fastattention | fastattention vs uncompiled | vs Inductor "
            "| compile s (Inductor / fastattention) | max \\|Δ logits\\| (Inductor / fastattention) |",
            "|---:|---:|---:|---:|---:|---:|---|---|"]
    for row in report["time"]:
        c = row["configs"]
        out.append(
            f"| {row['length']} | {c['uncompiled']['median_s']:.2f} s | {c['inductor']['median_s']:.2f} s | "
            f"{c['fastattention']['median_s']:.2f} s | **{c['fastattention']['speedup_vs_uncompiled']:.2f}×** | "
            f"{c['inductor']['median_s'] / c['fastattention']['median_s']:.2f}× | "
            f"{c['inductor']['compile_s']:.1f} / {c['fastattention']['compile_s']:.1f} | "
            f"{c['inductor']['max_abs_diff_logits']:.1e} / {c['fastattention']['max_abs_diff_logits']:.1e} |")
    out += ["", f"Peak memory of one prefill of {report['memory_length']} tokens, batch 2 (row 1 left-padded by "
            "10%), a one-layer Llama of the same width, growth of the process's peak RSS over the call "
            f"(compiled first at {report['memory_warm_length']} tokens with the sequence dim dynamic):", "",
            "| config | peak growth | call |", "|---|---:|---:|"]
    for config in CONFIGS:
        m = mem[config]
        if "error" in m:
            out.append(f"| {config} | error: {m['error']} | |")
        else:
            out.append(f"| {config} | {or_dash(m['peak_growth_mib'], 0)} MiB | {m['call_s']:.2f} s |")
    return "\n".join(out) + "\n"


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2K and 4K tokens; memory at 4K")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, to check the pipeline")
    p.add_argument("--out", type=Path, default=RESULTS / "sdpa_models_cpu", help="output path without extension")
    args = p.parse_args(argv)
    size = dict(layers=2, hidden=512, heads=8, window=WINDOW, vocab=32000)
    lengths, memory_length, warm_length, repeats = [4096, 8192, 16384], 16384, 512, 3
    if args.quick:
        lengths, memory_length = [2048, 4096], 4096
    if args.smoke:
        size = dict(layers=1, hidden=64, heads=4, window=16, vocab=128)
        lengths, memory_length, warm_length, repeats = [64], 96, 32, 1
    with CpuLoad() as load:
        memory = bench_memory(memory_length, warm_length, dict(size, layers=1))  # forks before any parallel region
        timed = bench_time(lengths, size, repeats)
    report = {"machine": machine_info(), "command": command_line("python -m benchmarks sdpa", sys.argv[1:] if argv is None else argv),
              "size": size, "repeats": repeats, "time": timed, "memory": memory, "memory_length": memory_length,
              "memory_warm_length": warm_length, "load": load.as_dict()}
    write_report(args.out, report, markdown(report))
    print(f"→ {args.out}.md", flush=True)


if __name__ == "__main__":
    main()
