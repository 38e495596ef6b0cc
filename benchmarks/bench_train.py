"""Training: one forward + backward of transformers models, uncompiled against Inductor and
fastattention, with the first (compiling) call timed with Inductor's caches off.

    python -m benchmarks train            # Llama 512-8K, Mistral and BERT at 2K, bf16 autocast at 512 (~20 min)
    python -m benchmarks train --quick    # Llama at 512 and 2K (~5 min)
    python -m benchmarks train --smoke    # tiny sizes: checks the pipeline (the test suite runs it)

* **models** (random weights, fp32 unless autocast): a GQA Llama (2 layers, hidden 512, 8 query /
  2 key-value heads × 64, MLP 1408, vocabulary 32000), Mistral of the same size with a sliding
  window of 1024, and BERT (2 layers, hidden 512, 8 heads, dropout off) with a right-padded batch row. Loss:
  the causal-LM loss on the input ids (BERT: the masked-LM loss on them), then ``backward()``;
  gradients are set to None between steps, no optimizer step.
* **configs**: the model as shipped (SDPA) uncompiled — the baseline —, compiled by Inductor, and
  compiled with fastattention; and the eager-attention model compiled with fastattention.
* **first call**: the compiling call, with Inductor's FX graph and autograd caches off and
  Dynamo reset, so every config compiles from nothing.
* **pairs**: the target's case measured once more as an A/B, each compiled config beside the
  uncompiled model alone in a fresh forked child (7 interleaved rounds after 2 warm-ups). With four
  models in one process the uncompiled model's step was seen to drift (1.5 s alone, up to 2.2 s in
  the four-way run), so the target verdict reads these pairs.
* **gradients**: every parameter's gradient compared with the uncompiled model's (max abs diff
  over all parameters, relative to the largest gradient entry).
* **memory**: peak RSS growth of one step in a forked child (``peak_memory.run_forked``), after
  a compiling step, at one length per model. That compiling step is also the fairest **first
  call**: each config compiles in its own fresh child, where in the main process the first config
  compiled pays the process's warm-up (imports, the C++ toolchain's first run) for the others.

Results: ``benchmarks/results/train_cpu.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from benchmarks.peak_memory import maxrss_mib, reset_peak, rss_mib, run_forked
from benchmarks.report_writing import command_line, write_report
from benchmarks.timing import CpuLoad, machine_info, measure_interleaved
from benchmarks.train_report import markdown, plot

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = {  # name: (attn_implementation, backend)
    "uncompiled": ("sdpa", None),
    "inductor": ("sdpa", "inductor"),
    "fastattention": ("sdpa", "fastattention"),
    "fastattention_eager_attn": ("eager", "fastattention"),
}


@dataclass(frozen=True)
class Plan:
    cases: tuple  # (family, tokens, dtype)
    memory: tuple  # (family, tokens)
    pairs: tuple  # (family, tokens): A/B of each compiled config against the uncompiled model
    sizes: dict
    window: int
    repeats: int


SIZES = dict(hidden=512, layers=2, heads=8, kv_heads=2, vocab=32000)
FULL = Plan(tuple(("llama", n, "fp32") for n in (512, 2048, 8192)) + (("mistral", 2048, "fp32"), ("bert", 2048, "fp32"),
                                                                       ("llama", 512, "bf16")),
            (("llama", 2048),), (("llama", 2048),), SIZES, 1024, 5)
QUICK = Plan((("llama", 512, "fp32"), ("llama", 2048, "fp32")), (("llama", 2048),), (("llama", 2048),), SIZES, 1024, 3)
SMOKE = Plan((("llama", 64, "fp32"), ("bert", 32, "fp32")), (("llama", 32),), (("llama", 32),),
             dict(hidden=64, layers=1, heads=4, kv_heads=2, vocab=256), 16, 1)


def build(family: str, attn: str, sizes: dict, window: int, max_positions: int) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    h = sizes["hidden"]
    common = dict(vocab_size=sizes["vocab"], hidden_size=h, num_hidden_layers=sizes["layers"],
                  num_attention_heads=sizes["heads"], max_position_embeddings=max_positions, attn_implementation=attn)
    if family == "bert":  # dropout off: gradients are compared, and a dropout site stays unfused (README)
        cfg = transformers.BertConfig(**common, intermediate_size=4 * h, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0)
        return transformers.BertForMaskedLM(cfg).train()
    kw = dict(common, intermediate_size=h * 11 // 4, num_key_value_heads=sizes["kv_heads"])
    if family == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**kw, sliding_window=window)).train()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).train()


def batch(family: str, tokens: int, vocab: int) -> dict:
    ids = torch.randint(0, vocab, (1 if family != "bert" else 2, tokens), generator=torch.Generator().manual_seed(tokens))
    inputs = {"input_ids": ids, "labels": ids}
    if family == "bert":  # row 1 right-padded by a quarter: the padding mask reaches attention
        mask = torch.ones_like(ids)
        mask[1, 3 * tokens // 4:] = 0
        inputs["attention_mask"] = mask
        inputs["labels"] = ids.masked_fill(mask == 0, -100)
    return inputs


def _autocast(dtype: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()


def train_step(fn, model, inputs: dict, dtype: str):
    """Forward + backward; returns the loss. Gradients from the previous step are dropped first."""
    for p in model.parameters():
        p.grad = None
    with _autocast(dtype):
        loss = fn(**inputs).loss
    loss.backward()
    return loss.detach()


def caches_off() -> None:
    """Inductor's FX graph cache and the autograd cache off: a first call compiles from nothing."""
    import torch._functorch.config
    import torch._inductor.config

    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False


def _compile(model, backend: Optional[str]):
    return model if backend is None else torch.compile(model, backend=backend)


def bench_case(family: str, tokens: int, dtype: str, plan: Plan) -> dict:
    inputs = batch(family, tokens, plan.sizes["vocab"])
    models, fns, first, losses, grads = {}, {}, {}, {}, {}
    for name, (attn, backend) in CONFIGS.items():
        if family == "bert" and name == "fastattention_eager_attn":
            attn = "eager"
        torch._dynamo.reset()
        model = build(family, attn, plan.sizes, plan.window, max(tokens, 512))
        fn = _compile(model, backend)
        t0 = time.perf_counter()
        losses[name] = train_step(fn, model, inputs, dtype).item()
        first[name] = time.perf_counter() - t0
        grads[name] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        models[name] = model
        fns[name] = (lambda f=fn, m=model: train_step(f, m, inputs, dtype))
    timings = measure_interleaved(fns, warmup=1, repeats=plan.repeats)
    base = grads["uncompiled"]
    scale = max(g.abs().max().item() for g in base.values())
    row = {"family": family, "tokens": tokens, "dtype": dtype, "configs": {}}
    for name, t in timings.items():
        diff = max((grads[name][n] - g).abs().max().item() for n, g in base.items())
        row["configs"][name] = {
            "median_s": t.median, "samples_s": t.samples, "first_call_s": first[name],
            "vs_uncompiled": timings["uncompiled"].median / t.median, "loss": losses[name],
            "max_grad_diff_rel": diff / scale, "grads_compared": len(base) == len(grads[name]),
        }
    print(f"train {family} {tokens} {dtype}: " + ", ".join(
        f"{n} {t.median:.2f} s (first {first[n]:.1f} s)" for n, t in timings.items()), file=sys.stderr, flush=True)
    return row


def _peak_child(family: str, tokens: int, config: str, plan: Plan) -> dict:
    attn, backend = CONFIGS[config]
    model = build(family, attn, plan.sizes, plan.window, max(tokens, 512))
    fn = _compile(model, backend)
    inputs = batch(family, tokens, plan.sizes["vocab"])
    t0 = time.perf_counter()
    train_step(fn, model, inputs, "fp32")  # compiles, and allocates the gradients
    first_call = time.perf_counter() - t0
    before = rss_mib()
    reset_peak()
    t0 = time.perf_counter()
    train_step(fn, model, inputs, "fp32")
    return {"peak_growth_mib": maxrss_mib() - before, "step_s": time.perf_counter() - t0, "first_call_s": first_call}


def _pair_child(family: str, tokens: int, config: str, plan: Plan) -> dict:
    """The uncompiled model and one compiled config, alone in this process, timed interleaved."""
    inputs = batch(family, tokens, plan.sizes["vocab"])
    attn, backend = CONFIGS[config]
    fns = {}
    for name, (a, b) in (("uncompiled", CONFIGS["uncompiled"]), (config, (attn, backend))):
        model = build(family, a, plan.sizes, plan.window, max(tokens, 512))
        fns[name] = (lambda f=_compile(model, b), m=model: train_step(f, m, inputs, "fp32"))
    timings = measure_interleaved(fns, warmup=2, repeats=7)
    return {name: {"median_s": t.median, "samples_s": t.samples} for name, t in timings.items()}


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="Llama at 512 and 2K tokens")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, to check the pipeline")
    p.add_argument("--out", type=Path, default=RESULTS / "train_cpu", help="output path without extension")
    args = p.parse_args(argv)
    plan = SMOKE if args.smoke else QUICK if args.quick else FULL
    caches_off()
    with CpuLoad() as load:
        memory = [{"family": f, "tokens": n, "configs": {c: run_forked(_peak_child, f, n, c, plan) for c in CONFIGS}}
                  for f, n in plan.memory]  # forked before any parallel region
        pairs = [{"family": f, "tokens": n, "configs": {c: run_forked(_pair_child, f, n, c, plan)
                                                        for c in CONFIGS if c != "uncompiled"}}
                 for f, n in plan.pairs]
        rows = [bench_case(f, n, d, plan) for f, n, d in plan.cases]
    report = {"machine": machine_info(), "command": command_line("python -m benchmarks train",
                                                                 sys.argv[1:] if argv is None else argv),
              "sizes": plan.sizes, "window": plan.window, "repeats": plan.repeats, "rows": rows, "memory": memory,
              "pairs": pairs, "load": load.as_dict()}
    write_report(args.out, report, markdown(report))
    plot(report, args.out.with_suffix(".png"))
    print(f"→ {args.out}.md", flush=True)


if __name__ == "__main__":
    main()
