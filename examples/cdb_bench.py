"""Continuous depth-wise batching against sequence-level batching: one engine, one artifact, one run.

    python examples/cdb_bench.py ARTIFACT [--streams 8] [--requests 32] [--new-tokens 64]
        [--policy calibrated --policy depth:1-3] [--text heldout.txt] [--threads 2] [--rounds 2]
        [--json OUT] [--plot PNG]

For every exit policy the same requests (greedy, prompts cut from --text or a built-in set) go
through `runtimes.engine.Engine` with `--streams` rows, once with the depth-wise scheduler and
once with the sequence-level one, in shuffled interleaved rounds; a full-depth run of the fused
graph (policy none) is the reference every mode is measured against.

Reported per policy and scheduler: generated tokens/s (median over rounds), mean loops per token,
rows per block call, idle row passes (sequence: rows waiting for the step's deepest row), block
calls per generated token, TTFT p50/p99 (submit to first token; every request is submitted at
t = 0, so it includes queueing) and whether the two schedulers' outputs are identical.

The goal of issue 13: depth-wise throughput >= 0.9 x (B / mean loops) x sequence-level throughput.
`ideal` is B / mean loops; `realised` the measured depth-wise / sequence-level ratio.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import edgeloop
from edgeloop.runtimes.engine import Engine

PROMPTS = ["And God said unto Moses", "In the beginning", "The LORD is my shepherd", "Blessed are the meek",
           "And it came to pass", "Now the serpent was", "Thus saith the LORD", "And Jesus answered"]


def prompts_for(text: Path | None, n: int, words: int = 12) -> list[str]:
    lines = []
    if text is not None:
        lines = [" ".join(line.split()[:words]) for line in text.read_text().splitlines() if len(line.split()) > 4]
    lines = lines or PROMPTS
    return [lines[(i * 7) % len(lines)] for i in range(n)]


def run(model, prompts, *, scheduler: str, policy: str, streams: int, new_tokens: int) -> dict:
    config = model.generation_config(max_new_tokens=new_tokens, ignore_eos=True, exit=policy)
    engine = Engine(model, max_rows=streams, max_queue=len(prompts), scheduler=scheduler)
    jobs = [engine.submit(model._request(p, config)) for p in prompts]
    t0 = time.perf_counter()
    engine.run_until_idle()
    wall = time.perf_counter() - t0
    m = engine.metrics
    depths = [d for j in jobs for d in j.request.stats.depths[1:]]  # the first token comes from the prompt
    ttft = [j.request._t0 + j.request.stats.prefill_s - j.submitted for j in jobs]
    calls = sum(m.rows_per_call.values())
    return {"tokens": m.tokens, "seconds": wall, "tok_s": m.tokens / wall,
            "mean_loops": float(np.mean(depths)) if depths else float(model.backend.loops),
            "depth_histogram": {str(d): int(c) for d, c in sorted(zip(*np.unique(depths, return_counts=True)))}
            if depths else {},
            "rows_per_block_call": sum(k * v for k, v in m.rows_per_call.items()) / calls if calls else 0.0,
            "block_calls_per_token": m.block_calls / m.tokens if m.tokens else 0.0,
            "idle_row_passes": m.idle_row_passes, "engine_steps": m.steps,
            "ttft_p50": float(np.percentile(ttft, 50)), "ttft_p99": float(np.percentile(ttft, 99)),
            "outputs": [j.request.generated for j in jobs]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifact", type=Path)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--policy", action="append", help="exit policies (default: calibrated and depth:1-3)")
    p.add_argument("--text", type=Path, help="prompts: the first words of this file's lines (e.g. heldout.txt)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    a = p.parse_args()

    model = edgeloop.load(a.artifact, threads=a.threads)
    loops = model.backend.loops
    policies = a.policy or ["calibrated", "depth:1-3"]
    resolved = {}
    for name in policies:
        if name == "calibrated":
            default = model.default_exit
            if default is None or str(default) == "none":
                print("the artifact has no calibrated exit policy (edgeloop calibrate); skipping 'calibrated'",
                      file=sys.stderr)
                continue
            resolved[f"calibrated ({default})"] = str(default)
        else:
            resolved[name] = name
    prompts = prompts_for(a.text, a.requests)
    run(model, prompts[: a.streams], scheduler="depth", policy="none", streams=a.streams, new_tokens=4)  # warm up

    cases = [("full depth (fused)", "none", "depth")] + [(k, v, s) for k, v in resolved.items()
                                                         for s in ("depth", "sequence")]
    results: dict[tuple[str, str], list[dict]] = {}
    rng = random.Random(a.seed)
    for r in range(a.rounds):
        order = list(cases)
        rng.shuffle(order)
        for label, policy, scheduler in order:
            res = run(model, prompts, scheduler=scheduler, policy=policy, streams=a.streams, new_tokens=a.new_tokens)
            results.setdefault((label, scheduler), []).append(res)
            print(f"round {r + 1}: {label:<28} {scheduler:<8} {res['tok_s']:8.1f} tok/s  "
                  f"loops {res['mean_loops']:.2f}", file=sys.stderr)

    def summary(key):
        runs = results[key]
        best = dict(runs[0])
        best["tok_s"] = statistics.median(x["tok_s"] for x in runs)
        best["ttft_p50"] = statistics.median(x["ttft_p50"] for x in runs)
        best["ttft_p99"] = statistics.median(x["ttft_p99"] for x in runs)
        return best

    full = summary(("full depth (fused)", "depth"))
    rows = []
    print(f"\n{a.artifact}: B = {loops}, {a.streams} streams, {a.requests} requests x {a.new_tokens} tokens, "
          f"{a.threads} threads, median of {a.rounds} rounds\n")
    print("| policy | scheduler | tok/s | vs full depth | mean loops | rows/block call | block calls/token | "
          "idle row passes | TTFT p50 / p99 (s) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| none | fused graph | {full['tok_s']:.1f} | 1.00x | {loops:.2f} | - | - | - | "
          f"{full['ttft_p50']:.3f} / {full['ttft_p99']:.3f} |")
    for label in resolved:
        d, s = summary((label, "depth")), summary((label, "sequence"))
        for name, x in (("depth-wise", d), ("sequence", s)):
            print(f"| {label} | {name} | {x['tok_s']:.1f} | {x['tok_s'] / full['tok_s']:.2f}x | "
                  f"{x['mean_loops']:.2f} | "
                  f"{x['rows_per_block_call']:.2f} | {x['block_calls_per_token']:.3f} | {x['idle_row_passes']} | "
                  f"{x['ttft_p50']:.3f} / {x['ttft_p99']:.3f} |")
        ideal = loops / d["mean_loops"]
        realised = d["tok_s"] / s["tok_s"]
        same = d["outputs"] == s["outputs"]
        rows.append({"policy": label, "depth": {k: v for k, v in d.items() if k != "outputs"},
                     "sequence": {k: v for k, v in s.items() if k != "outputs"}, "ideal": ideal,
                     "realised": realised, "goal": 0.9 * ideal, "met": realised >= 0.9 * ideal,
                     "identical_outputs": same})
    print("\n| policy | ideal B / mean loops | goal 0.9 x ideal | realised depth / sequence | met | "
          "identical outputs |")
    print("|---|---:|---:|---:|---|---|")
    for r in rows:
        print(f"| {r['policy']} | {r['ideal']:.2f}x | {r['goal']:.2f}x | {r['realised']:.2f}x | "
              f"{'yes' if r['met'] else 'no'} | {'yes' if r['identical_outputs'] else 'NO'} |")
    if a.json:
        a.json.write_text(json.dumps({"artifact": str(a.artifact), "loops": loops, "streams": a.streams,
                                      "requests": a.requests, "new_tokens": a.new_tokens, "threads": a.threads,
                                      "full_depth": {k: v for k, v in full.items() if k != "outputs"},
                                      "policies": rows}, indent=1))
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        labels = [r["policy"] for r in rows]
        x = np.arange(len(labels))
        ax.bar(x - 0.2, [r["sequence"]["tok_s"] for r in rows], 0.4, label="sequence-level")
        ax.bar(x + 0.2, [r["depth"]["tok_s"] for r in rows], 0.4, label="depth-wise")
        ax.axhline(full["tok_s"], color="k", ls="--", lw=1, label="full depth (fused)")
        ax.set_xticks(x, labels)
        ax.set_ylabel("generated tok/s")
        ax.set_title(f"{a.streams} streams, B = {loops}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.plot, dpi=120)
    return 0 if all(r["identical_outputs"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
