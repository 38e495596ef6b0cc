"""One entry point for every benchmark suite: ``python -m benchmarks <suite> [suite args]``.

    python -m benchmarks --list            # the suites and their estimated run times
    python -m benchmarks op --quick        # a suite, with its own arguments (``op --help``)
    python -m benchmarks all               # every suite in turn, default arguments

Each suite is a module with ``main(argv)`` that writes its results under ``benchmarks/results/``;
modules are imported only when their suite runs, so ``--list`` starts no torch.
"""

from __future__ import annotations

import importlib
import sys
from typing import NamedTuple, Optional


class Suite(NamedTuple):
    module: str
    what: str
    estimate: str  # default run on 2 idle CPU cores unless said otherwise


SUITES = {
    "op": Suite("benchmarks.bench_attention_cpu", "op-level CPU attention: fa_dynamo op vs eager, SDPA, Inductor, Flex",
                "~26 min (--quick ~3 min, --smoke ~25 s, --full ~2 h)"),
    "e2e": Suite("benchmarks.bench_e2e_cpu", "end-to-end CPU: transformers models compiled with fastattention",
                 "~25-30 min (--quick ~3 min, --tiny ~1 min)"),
    "gpu": Suite("benchmarks.bench_attention_gpu", "op-level GPU attention (needs CUDA)",
                 "GPU only; --smoke ~30 s on CPU"),
    "coverage": Suite("benchmarks.coverage", "which attention sites fuse on the transformers corpus",
                      "12-30 min (--no-inductor 3-5 min)"),
    "sdpa": Suite("benchmarks.bench_sdpa_models", "transformers models as shipped (SDPA): uncompiled vs Inductor vs "
                  "fastattention, prefill time and memory", "~15 min (--quick ~3 min, --smoke ~20 s)"),
    "decode": Suite("benchmarks.bench_decode", "decode: GQA attention over a KV cache (op) and a Llama step over "
                    "static/dynamic caches, GB/s against the read bandwidth", "~15 min (--quick ~4 min, --smoke ~30 s)"),
    "train": Suite("benchmarks.bench_train", "training: forward + backward of Llama, Mistral, BERT, uncompiled vs "
                   "Inductor vs fastattention, first-call time, peak memory", "~20 min (--quick ~5 min, --smoke ~1 min)"),
    "allreduce": Suite("benchmarks.bench_allreduce", "tiling all_reduce on 2 gloo ranks", "~5 min (--quick < 1 min)"),
}
USAGE = "usage: python -m benchmarks {" + "|".join(SUITES) + "|all} [suite args]   |   python -m benchmarks --list"


def list_suites() -> str:
    width, est_width = max(map(len, SUITES)), max(len(s.estimate) for s in SUITES.values())
    return "\n".join(f"{name:<{width}}  {s.estimate:<{est_width}}  {s.what}" for name, s in SUITES.items())


def run_suite(name: str, argv: list[str]) -> int:
    """Import the suite's module and call its ``main(argv)``; exit code (``None`` counts as 0)."""
    module_name = SUITES[name].module
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise  # the suite exists but something it imports is missing: show the real error
        print(f"suite {name!r}: module {module_name} does not exist in this checkout", file=sys.stderr)
        return 2
    code = module.main(argv)
    return 0 if code is None else int(code)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + list_suites())
        return 0 if argv else 2
    if argv[0] == "--list":
        print(list_suites())
        return 0
    name, rest = argv[0], argv[1:]
    if name == "all":
        if rest:
            print("`all` runs every suite with its default arguments; pass arguments to one suite instead",
                  file=sys.stderr)
            return 2
        failed = [n for n in SUITES if run_suite(n, []) != 0]
        if failed:
            print(f"suites that failed: {', '.join(failed)}", file=sys.stderr)
        return 1 if failed else 0
    if name not in SUITES:
        print(f"unknown suite {name!r}\n{USAGE}", file=sys.stderr)
        return 2
    return run_suite(name, rest)


if __name__ == "__main__":
    sys.exit(main())
