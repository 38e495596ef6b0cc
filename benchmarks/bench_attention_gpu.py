"""GPU benchmark: fa_dynamo's Triton attention kernel against SDPA, FlexAttention and xformers.

On a CUDA machine, from the repository root (nothing to install: ``fa_dynamo`` is imported from
the tree; torch, triton and matplotlib must be there; xformers is used when importable)::

    python -m benchmarks.bench_attention_gpu          # full matrix → benchmarks/results/

On this workplace's device machine (the ``run`` tool: 10 minutes a command, 30 minutes a
session, only ``$OUT`` comes back, the machine stays warm 30 s after a call) run the matrix in
parts. After each part copy its three files from ``files_at`` into ``benchmarks/results/`` and
start the next part at once (a warm machine keeps Triton's and Inductor's compile caches); each
part names the previous part's JSON, so the last part's files hold everything::

    PYTHONUNBUFFERED=1 python3 -m benchmarks.bench_attention_gpu --out $OUT --budget-s 500 \
        --head-dims 64 --passes fwd
    PYTHONUNBUFFERED=1 python3 -m benchmarks.bench_attention_gpu --out $OUT --budget-s 500 \
        --head-dims 64 --passes fwd_bwd --merge-from benchmarks/results/attention_gpu_<slug>.json
    # … the same for --head-dims 128; <slug> is printed on the first line, e.g. nvidia-h100-80gb-hbm3

No GPU run has happened yet, so how long a part takes is unknown (Flex compiles once per shape,
the Triton kernel autotunes once per length class). With ``--budget-s`` a part starts no case
after that many seconds and lists the cases left (rerun them with ``--lengths`` and
``--merge-from``); every case is written as soon as it is done, so a killed run keeps its
finished cases.

CI checks the pipeline without a GPU: ``--smoke --out DIR`` runs tiny shapes on CPU tensors (the
Triton kernel in Triton's interpreter, SDPA's CPU kernels, FlexAttention eagerly, a wall-clock
timer) and writes the same three files. Its numbers are not GPU figures. Without CUDA and
without ``--smoke`` the script measures nothing and exits with status 2.

**What is measured.** For each sequence length S (512 … 32768), head dim d (64, 128), causal or
not, forward (``fwd``) or forward+backward (``fwd_bwd``), on the same bf16 q/k/v (``--dtype fp16``
optional): ``fa_dynamo.attention`` with ``kernel="triton"`` and ``kernel="auto"`` (on CUDA the
latter dispatches to the same Triton kernel: it measures what a user gets by default); SDPA
restricted to each backend by ``sdpa_kernel`` (flash, efficient, cuDNN, math);
``torch.compile(flex_attention)`` with a causal ``create_block_mask`` built before timing;
xformers' ``memory_efficient_attention`` (``LowerTriangularMask`` for causal) on the BMHK view
of the same tensors. Shapes follow FlashAttention's ``benchmark_flash_attention.py``: batch
B = 16384 // S (at least 1), heads H = 2048 // d, so tokens × model width stay constant up to
16K tokens. ``--gqa G`` gives K/V H / G heads (SDPA and Flex with ``enable_gqa=True``, xformers
in its 5-D BMGHK layout).

* time: median of ``triton.testing.do_bench`` (L2 flushed before each call, gradients set to
  None between calls), after one untimed call that compiles and autotunes;
* TFLOP/s: 4·B·H·S²·d per forward (two GEMMs), halved when causal, and × 3.5 for fwd+bwd (the
  backward counted as 2.5 forwards, as FlashAttention's benchmark does), over the median time —
  the same count for every method, so the ratios are speed ratios;
* peak memory: ``torch.cuda.max_memory_allocated`` during one separate call, minus what was
  allocated before it (inputs): workspace, output and, for fwd+bwd, the gradients;
* correctness: at each configuration's first (smallest) length, when it is at most 2048,
  every method's output (and dq, dk, dv) is compared with SDPA math in float64; it passes when
  its max error is at most 2× (outputs) or 3× (gradients) the error of SDPA math in the
  benchmark dtype, plus 2 ulps of the reference's largest value. A failed check marks all of
  that method's numbers in the configuration with ✗;
* failures never stop the run: OOM is recorded as ``OOM``, anything else (no kernel for these
  inputs, not importable, a fa_dynamo fallback to another kernel) as its first line. If a
  failure leaves the CUDA context unusable, the run stops, keeps what it has and exits 3.

**How to read it.** ``benchmarks/results/attention_gpu_<device-slug>.md`` has one row per case,
one TFLOP/s column per method (higher is better) and ``triton/flash``, the Triton kernel's
TFLOP/s over SDPA flash's (> 1: the Triton kernel is faster); then peak memory, the
correctness table and the failures. The ``.json`` has every number (ms, TFLOP/s, MiB, errors)
and the ``.png`` plots TFLOP/s against S per method. Every file names the device, the CUDA,
torch and Triton versions and the date.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import logging
import math
import os
import re
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from benchmarks.attention_gpu_cases import PASSES, Case, matrix
from benchmarks.attention_gpu_report import markdown, plot, versions_line
from benchmarks.failures import error_line, is_out_of_memory
from benchmarks.report_writing import command_line, write_report
from benchmarks.timing import cpu_model, machine_info, measure

# fa_dynamo imports triton, which reads TRITON_INTERPRET once: it is imported inside the method
# builders, after main() has settled that variable.

RESULTS = Path(__file__).resolve().parent / "results"
LENGTHS = (512, 1024, 2048, 4096, 8192, 16384, 32768)
HEAD_DIMS = (64, 128)
TOKENS, MODEL_DIM = 16384, 2048  # B = TOKENS // S, H = MODEL_DIM // d (FlashAttention's benchmark)
SMOKE_LENGTHS, SMOKE_HEAD_DIMS, SMOKE_TOKENS, SMOKE_MODEL_DIM = (64, 128), (16, 32), 128, 64
SMOKE_REPEATS = 1
MASKS = ("causal", "full")
CHECK_MAX_LEN = 2048  # the float64 reference materializes B·H·S² scores (and their gradients)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MiB = 1024**2
NO_CUDA = "no CUDA device: no GPU figures measured; run on a GPU machine (or pass --smoke for the CPU pipeline check)"


# --- the methods: each builds, outside the timed region, a call returning [B, H, S, d] ----------


class Unavailable(RuntimeError):
    """The method cannot serve this case here (not importable, unsupported inputs, a fallback)."""


def _fa_dynamo(kernel: str):
    def build(case: Case, q, k, v, smoke: bool):
        import fa_dynamo

        if kernel == "triton":
            from fa_dynamo.kernels.triton.forward import unsupported_reason

            reason = unsupported_reason(q, v)
            if reason is not None:
                raise Unavailable(reason)
        band = {"max_offset": 0} if case.causal else {}  # causal: key j visible iff j - i <= 0
        return lambda: fa_dynamo.attention(q, k, v, kernel=kernel, **band)

    return build


def _sdpa(backend_name: str):
    def build(case: Case, q, k, v, smoke: bool):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name)
        gqa = {"enable_gqa": True} if case.kv_heads != case.heads else {}

        def call():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=case.causal, **gqa)

        return call

    return build


def _causal_mask_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(case: Case, q, k, v, smoke: bool):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    block_mask = None
    if case.causal:
        block_mask = create_block_mask(_causal_mask_mod, None, None, case.seq_len, case.seq_len, device=q.device)
    flex = flex_attention if smoke else _compiled_flex()  # compiling on CPU would take minutes
    gqa = case.kv_heads != case.heads
    return lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def _xformers(case: Case, q, k, v, smoke: bool):
    try:
        import xformers.ops as xops
    except ImportError as e:
        raise Unavailable(f"xformers is not importable ({e})") from None
    bias = xops.fmha.attn_bias.LowerTriangularMask() if case.causal else None  # top-left causal
    batch, heads, seq, head_dim = q.shape
    group = heads // case.kv_heads

    def call():
        qx, kx, vx = (t.transpose(1, 2) for t in (q, k, v))  # BMHK views, no copies
        if group > 1:  # BMGHK: query head h = g·group + i reads key/value head g
            qx = qx.unflatten(2, (case.kv_heads, group))
            kx, vx = (t.unsqueeze(3).expand(-1, -1, -1, group, -1) for t in (kx, vx))
        out = xops.memory_efficient_attention(qx, kx, vx, attn_bias=bias, scale=head_dim**-0.5)
        return out.reshape(batch, seq, heads, -1).transpose(1, 2)

    return call


METHODS: dict[str, Callable] = {
    "fa_dynamo_triton": _fa_dynamo("triton"),
    "fa_dynamo_auto": _fa_dynamo("auto"),
    "sdpa_flash": _sdpa("FLASH_ATTENTION"),
    "sdpa_efficient": _sdpa("EFFICIENT_ATTENTION"),
    "sdpa_cudnn": _sdpa("CUDNN_ATTENTION"),
    "sdpa_math": _sdpa("MATH"),
    "flex": _flex,
    "xformers": _xformers,
}

# --- correctness ---------------------------------------------------------------------------------


def _outputs(call: Callable, case: Case, inputs, dout) -> list[torch.Tensor]:
    """[out] or [out, dq, dk, dv] of one call."""
    for t in inputs:
        t.grad = None
    out = call()
    if not case.backward:
        return [out.detach()]
    out.backward(dout)
    return [out.detach()] + [t.grad for t in inputs]


def math_outputs(case: Case, inputs, dout, dtype: torch.dtype) -> list[torch.Tensor]:
    """SDPA math on copies of the inputs in ``dtype``: the reference (float64) or the baseline."""
    copies = [t.detach().to(dtype).requires_grad_(case.backward) for t in inputs]
    call = _sdpa("MATH")(case, *copies, smoke=False)
    return _outputs(call, case, copies, None if dout is None else dout.to(dtype))


def compare(got, reference, baseline, dtype: torch.dtype) -> dict:
    """Pass when each tensor's max error ≤ 2× (out) / 3× (grads) SDPA math's own + 2 ulps."""
    eps = torch.finfo(dtype).eps
    errors = {}
    for name, g, r, b in zip(("out", "dq", "dk", "dv"), got, reference, baseline):
        r = r.double()
        factor = 2.0 if name == "out" else 3.0
        tol = factor * (b.double() - r).abs().max().item() + 2 * eps * r.abs().max().item()
        err = (g.double() - r).abs().max().item() if torch.isfinite(g).all() else math.inf
        errors[name] = {"max_err": err, "tol": tol}
    return {"ok": all(e["max_err"] <= e["tol"] for e in errors.values()), "errors": errors}


# --- one method on one case ----------------------------------------------------------------------


class DeviceBroken(RuntimeError):
    """A failure left the CUDA context unusable: nothing after it can be measured."""


class _ListHandler(logging.Handler):
    def __init__(self, messages: list[str]):
        super().__init__(logging.WARNING)
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class _Heard:
    """Collects fa_dynamo's warnings (each a fallback) and Python warnings (SDPA's reasons)."""

    def __enter__(self) -> "_Heard":
        from fa_dynamo.logs import warn_once

        warn_once.cache_clear()  # fa_dynamo says each fallback once per process
        self.logs: list[str] = []
        self._handler = _ListHandler(self.logs)
        logging.getLogger("fa_dynamo").addHandler(self._handler)
        self._catch = warnings.catch_warnings(record=True)
        self.warnings = self._catch.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc) -> None:
        self._catch.__exit__(*exc)
        logging.getLogger("fa_dynamo").removeHandler(self._handler)

    def reasons(self) -> str:
        lines = {str(w.message).strip().splitlines()[0] for w in self.warnings if str(w.message).strip()}
        return "; ".join(sorted(lines)[:3])


def describe_failure(e: BaseException, heard: Optional[_Heard] = None) -> str:
    """``OOM``, an ``Unavailable``'s own reason, or the error line with what fa_dynamo / SDPA warned."""
    if is_out_of_memory(e):
        return "OOM"
    message = error_line(e).split(": ", 1)[1] if isinstance(e, Unavailable) else error_line(e)
    reasons = heard.reasons() if heard is not None and not isinstance(e, Unavailable) else ""
    return (f"{message} [{reasons}]" if reasons else message)[:400]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: torch.device) -> None:
    """Give a failed or finished method's GPU memory back before the next one (gc: ~0.2 s, so CUDA only)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def gpu_timer(step: Callable, grads: list) -> float:
    """Seconds: the median of triton's do_bench (L2 flushed, grads reset, outside the timing)."""
    from triton.testing import do_bench

    return do_bench(step, grad_to_none=grads or None, return_mode="median") / 1e3


def cpu_timer(step: Callable, grads: list) -> float:
    """Seconds: the median of a few wall-clock calls (--smoke only; not a GPU figure)."""

    def call():
        for t in grads:
            t.grad = None
        step()

    return measure(call, warmup=0, repeats=SMOKE_REPEATS).median


def peak_memory_mib(step: Callable, device: torch.device, grads: list) -> Optional[float]:
    """Peak allocation of one call above what was allocated before it (None off CUDA)."""
    if device.type != "cuda":
        return None
    for t in grads:
        t.grad = None
    _release(device)
    _sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / MiB


def measure_method(build, case: Case, inputs, dout, timer, smoke: bool, reference=None) -> dict:
    """``{ms, tflops, peak_mib[, check]}`` or ``{error}``; ``reference``: (ref, baseline) to check."""
    device = inputs[0].device
    grads = list(inputs) if case.backward else []
    heard = _Heard()
    result: dict = {}
    try:
        with heard:
            call = build(case, *inputs, smoke=smoke)
            step = call if not case.backward else (lambda: call().backward(dout))
            step()  # compiles, autotunes
            _sync(device)
        if heard.logs:
            raise Unavailable(f"fa_dynamo fell back: {heard.logs[0]}")
        if reference is not None:
            got = _outputs(call, case, inputs, dout)
            result["check"] = compare(got, *reference, inputs[0].dtype)
            del got
        result["peak_mib"] = peak_memory_mib(step, device, grads)
        seconds = timer(step, grads)
        result.update(ms=seconds * 1e3, tflops=case.flop / seconds / 1e12)
    except Exception as e:  # every failure is a result; only a broken device stops the run
        result = {"error": describe_failure(e, heard)}
    call = step = None
    try:
        _sync(device)
    except Exception as e:
        raise DeviceBroken(f"CUDA context unusable after {case.key}: {describe_failure(e)}") from e
    _release(device)
    return result


# --- the run -------------------------------------------------------------------------------------


def make_inputs(case: Case, dtype: torch.dtype, device: torch.device, seed: int = 0):
    g = torch.Generator(device).manual_seed(seed)
    shapes = [(case.batch, h, case.seq_len, case.head_dim) for h in (case.heads, case.kv_heads, case.kv_heads)]
    inputs = [torch.randn(s, generator=g, device=device, dtype=dtype).requires_grad_(case.backward) for s in shapes]
    dout = torch.randn(shapes[0], generator=g, device=device, dtype=dtype) if case.backward else None
    return inputs, dout


def reference_for(case: Case, inputs, dout, dtype: torch.dtype):
    """(float64 SDPA math, SDPA math in the benchmark dtype), or an error string."""
    try:
        return math_outputs(case, inputs, dout, torch.float64), math_outputs(case, inputs, dout, dtype)
    except Exception as e:
        return describe_failure(e)


def run(cases: list[Case], methods: list[str], report: dict, args, device: torch.device, write) -> int:
    """Measure every case, writing the report after each; returns the exit status."""
    dtype = DTYPES[args.dtype]
    timer = cpu_timer if args.smoke else gpu_timer
    first = {}
    for c in cases:
        first[c.config] = min(first.get(c.config, c.seq_len), c.seq_len)
    start = time.monotonic()
    for i, case in enumerate(cases):
        if args.budget_s is not None and time.monotonic() - start > args.budget_s:
            left = [c.key for c in cases[i:]]
            report["not_run"] = left
            print(f"time budget of {args.budget_s} s spent; {len(left)} cases not run: {' '.join(left)}", file=sys.stderr)
            return 0
        print(f"[{i + 1}/{len(cases)}] {case.key} B={case.batch} H={case.heads}/{case.kv_heads}", flush=True)
        inputs, dout = make_inputs(case, dtype, device)
        checked_here = case.seq_len == first[case.config] and case.seq_len <= CHECK_MAX_LEN
        reference = reference_for(case, inputs, dout, dtype) if checked_here else None
        row = report["cases"].setdefault(case.key, {"case": asdict(case), "flop": case.flop, "results": {}})
        try:
            for name in methods:
                checked = reference if isinstance(reference, tuple) else None
                row["results"][name] = result = measure_method(
                    METHODS[name], case, inputs, dout, timer, args.smoke, checked
                )
                if isinstance(reference, str) and "error" not in result:
                    result["check"] = {"ok": None, "error": f"no reference: {reference}"}
                shown = result.get("error") or f"{result['tflops']:.3g} TFLOP/s"
                print(f"    {name:18s} {shown}", flush=True)
        except DeviceBroken as e:
            print(f"{e}; stopping, results so far are saved", file=sys.stderr)
            return 3
        finally:
            del inputs, dout, reference
            _release(device)
            write(report)
    report.pop("not_run", None)
    return 0


# --- the device and the report it goes into --------------------------------------------------


def device_info(smoke: bool) -> dict:
    import triton

    try:
        import xformers

        xformers_version = getattr(xformers, "__version__", "unknown")
    except ImportError:
        xformers_version = None
    info = {"torch": torch.__version__, "triton": triton.__version__, "xformers": xformers_version}
    if smoke:
        return {"device": f"CPU smoke run ({cpu_model()})", "slug": "smoke-cpu", "cuda": None, **info}
    props = torch.cuda.get_device_properties(0)
    name = torch.cuda.get_device_name(0)
    return {
        "device": name,
        "slug": re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"),
        "capability": f"sm{props.major}{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "gpu_memory_gib": round(props.total_memory / 1024**3, 1),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        **info,
    }


def new_report(args, gpu: dict, methods: list[str], command: str) -> dict:
    host = machine_info()
    settings = {
        "smoke": args.smoke, "dtype": args.dtype, "gqa": args.gqa, "tokens": args.tokens, "model_dim": args.model_dim,
        "timer": f"wall clock, {SMOKE_REPEATS} call after a warm-up (smoke)" if args.smoke else "triton.testing.do_bench median",
    }
    report = {"device": gpu, "host": host, "settings": settings, "methods": methods,
              "runs": [{"command": command, "date": host["date"]}], "cases": {}}
    if args.merge_from:
        old = json.loads(Path(args.merge_from).read_text())
        if old["device"]["device"] != gpu["device"] or old["settings"] != settings:
            raise ValueError(
                f"--merge-from {args.merge_from} was measured on {old['device']['device']} with {old['settings']}; "
                f"this run is on {gpu['device']} with {settings}: merge only parts of the same benchmark"
            )
        report["runs"] = old["runs"] + report["runs"]
        report["methods"] = [m for m in METHODS if m in set(old["methods"]) | set(methods)]
        report["cases"] = old["cases"]
    return report


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU tensors (Triton interpreter): a pipeline check")
    p.add_argument("--out", type=Path, help="folder for attention_gpu_<device>.{json,md,png} (default benchmarks/results)")
    p.add_argument("--lengths", type=int, nargs="+", help=f"sequence lengths (default {LENGTHS}; smoke {SMOKE_LENGTHS})")
    p.add_argument("--head-dims", type=int, nargs="+", help=f"head dims (default {HEAD_DIMS}; smoke {SMOKE_HEAD_DIMS})")
    p.add_argument("--masks", nargs="+", choices=MASKS, default=list(MASKS))
    p.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES))
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--gqa", type=int, default=1, help="query heads per key/value head (1: no GQA)")
    p.add_argument("--tokens", type=int, help=f"B = tokens // S (default {TOKENS}; smoke {SMOKE_TOKENS})")
    p.add_argument("--model-dim", type=int, help=f"H = model_dim // d (default {MODEL_DIM}; smoke {SMOKE_MODEL_DIM})")
    p.add_argument("--budget-s", type=float, help="start no new case after this many seconds")
    p.add_argument("--merge-from", type=Path, help="an earlier part's JSON (same device and settings) to extend")
    args = p.parse_args(argv)
    args.lengths = args.lengths or list(SMOKE_LENGTHS if args.smoke else LENGTHS)
    args.head_dims = args.head_dims or list(SMOKE_HEAD_DIMS if args.smoke else HEAD_DIMS)
    args.tokens = args.tokens or (SMOKE_TOKENS if args.smoke else TOKENS)
    args.model_dim = args.model_dim or (SMOKE_MODEL_DIM if args.smoke else MODEL_DIM)
    if args.smoke and args.out is None:
        raise ValueError("--smoke needs --out DIR: its CPU numbers do not belong in benchmarks/results")
    args.out = args.out or RESULTS
    if min(args.lengths) < 1 or args.tokens < 1:
        raise ValueError(f"lengths and --tokens must be positive, got {args.lengths}, {args.tokens}")
    return args


def _allow_one_graph_per_shape() -> None:
    """Flex is compiled with static shapes (one graph per case): never fall back to eager silently."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, 1024)
    if hasattr(config, "fail_on_recompile_limit_hit"):
        config.fail_on_recompile_limit_hit = True


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("--smoke needs TRITON_INTERPRET=1 before triton is imported; run it in a fresh process")
        os.environ["TRITON_INTERPRET"] = "1"
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
        _allow_one_graph_per_shape()
    cases = matrix(args.lengths, args.head_dims, args.masks, args.passes, args.tokens, args.model_dim, args.gqa)
    gpu = device_info(args.smoke)
    command = command_line("python -m benchmarks.bench_attention_gpu", sys.argv[1:] if argv is None else argv)
    report = new_report(args, gpu, args.methods, command)
    stem = args.out / f"attention_gpu_{gpu['slug']}"

    def write(rep: dict) -> None:
        write_report(stem, rep, markdown(rep))

    print(f"{gpu['device']}; {versions_line(gpu)}; {len(cases)} cases × {len(args.methods)} methods "
          f"→ {stem}.{{json,md,png}}", flush=True)
    status = run(cases, args.methods, report, args, device, write)
    write(report)
    plot(report, stem.with_name(stem.name + ".png"))
    print(f"wrote {stem}.json, .md, .png", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
