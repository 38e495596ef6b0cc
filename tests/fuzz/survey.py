"""Survey: run many generated programs without stopping at the first failure.

    python -m tests.fuzz.survey --examples 500 [--seed 1] [--skip near=k_only_gqa,...] [--out DIR]

Prints how many attention programs were fused, the refusal reasons for those that were not,
and every failure grouped by kind; each failing program's source is written to ``DIR`` (for
minimising into ``tests/fuzz/regressions.py``). ``--skip`` drops programs carrying any of the
given tags (``near=k_only_gqa``, ``qk=einsum_ellipsis``, ``fill=torch.finfo(torch.float32).min``
...) so that a survey can look past bugs already known.

Not a test: the property lives in ``test_fuzz_programs.py``; this is the tool for reading the
matcher's coverage and for finding many distinct bugs in one long run.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import time

import torch
from hypothesis import HealthCheck, given, seed, settings

from tests.fuzz import harness
from tests.fuzz.programs import programs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", default="", help="comma-separated tags; programs carrying any are skipped")
    parser.add_argument("--out", default="", help="directory for the sources of failing programs")
    args = parser.parse_args()
    skip = [t for t in args.skip.split(",") if t]
    torch._dynamo.config.cache_size_limit = 64
    stats: collections.Counter = collections.Counter()
    reasons: collections.Counter = collections.Counter()
    failures: dict = collections.defaultdict(list)
    start = time.time()

    @seed(args.seed)
    @settings(max_examples=args.examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(program=programs())
    def survey(program):
        if any(t in program.tags for t in skip):
            stats["skipped"] += 1
            return
        family = "attention" if program.is_attention else "near-miss"
        stats[family] += 1
        try:
            outcome = harness.check(program.source, require_fusion=False)
        except Exception as e:  # noqa: BLE001
            key = f"{type(e).__name__}: {_generic(str(e).splitlines()[0] if str(e) else '')}"
            failures[key].append(program.source)
            stats[f"{family} failed"] += 1
            return
        if program.is_attention and program.expect_fused:
            stats["attention (fusion expected)"] += 1
            stats["attention fused" if outcome.fused else "attention not fused"] += 1
            if not outcome.fused:
                for _, why in outcome.refused or [("", "no softmax site")]:
                    reasons[_generic(why)] += 1
        elif not program.is_attention:
            stats["near-miss fused" if outcome.fused else "near-miss not fused"] += 1

    survey()
    print(f"{args.examples} examples in {time.time() - start:.0f} s (seed {args.seed})")
    for key, n in sorted(stats.items()):
        print(f"  {n:5d}  {key}")
    expected = stats["attention (fusion expected)"]
    if expected:
        print(f"fused: {stats['attention fused']}/{expected} = {stats['attention fused'] / expected:.1%} of attention programs")
    print("refusal reasons (attention programs):")
    for why, n in reasons.most_common():
        print(f"  {n:5d}  {why}")
    print("failures:")
    for key, sources in sorted(failures.items(), key=lambda kv: -len(kv[1])):
        print(f"  {len(sources):5d}  {key[:160]}")
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            for n, src in enumerate(sources[:5]):
                name = re.sub(r"\W+", "_", key)[:60]
                with open(os.path.join(args.out, f"{name}_{n}.py"), "w") as f:
                    f.write(f"# {key}\n{src}")


def _generic(text: str) -> str:
    text = re.sub(r"0x[0-9a-f]+|<fuzz-program-\d+>", "", text)
    text = re.sub(r"\{[^}]*\}|\([\d, ]+\)|-?\d+(\.\d+)?(e-?\d+)?", "#", text)
    return text[:140]


if __name__ == "__main__":
    main()
