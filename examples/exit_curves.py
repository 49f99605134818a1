"""Early exit on one artifact: the quality/speed curve of every policy, self-speculation, KV strategies.

    python examples/exit_curves.py ARTIFACT --text examples/kjv-tiny/heldout.txt [--tokens 4096]
        [--decode-tokens 128] [--threads 2] [--rounds 3] [--merged-og OG_DIR] [--json OUT] [--plot PNG]

1. **Curves (simulated, every position at once).** The held-out text runs the host-driven loop at
   full depth; the head reads every loop boundary of every position (`calibrate.probe`); each
   policy and threshold on `calibrate`'s grids (and every forced depth) is simulated on those
   logits: mean loops, mean KL to full depth, top-1 agreement, perplexity.
2. **Verified points (exact).** For each policy, the threshold with the fewest loops whose
   simulated perplexity is within --max-ppl (default +1%) is decoded token by token,
   teacher-forced, with the real exits and each KV strategy (`fill`, `recursion`): the numbers a
   user's run gets.
3. **Speed.** Greedy single-stream decode of --decode-tokens tokens after a held-out prompt, in
   shuffled interleaved rounds: full depth on the fused graph, full depth through the host loop,
   each verified point, self-speculation (`speculate:DxN`, with acceptance), and, with
   --merged-og, onnxruntime-genai on the merged twin of the same model.
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
from edgeloop.runtimes import calibrate as cal
from edgeloop.runtimes.exits import ExitPolicy, parse_policy

sys.path.insert(0, str(Path(__file__).resolve().parent))


def curves(model, ids: np.ndarray) -> tuple[list[dict], list[np.ndarray]]:
    backend = model.backend
    logp, gates = cal.probe(backend, ids, min(512, backend.max_context))
    spec = model.contract.model
    rows = []
    policies = cal.candidates(["confidence", "agreement", "entropy", "kl", "gate"], backend.loops, spec.exit_gate)
    policies += [ExitPolicy("depth", count=d) for d in range(1, backend.loops + 1)]
    for policy in policies:
        depths = cal.simulate(policy, logp, gates)
        exit_lp = np.stack([logp[d - 1][i] for i, d in enumerate(depths)])
        q = cal.quality(logp[-1], exit_lp, ids, depths)
        q["ppl_increase"] = q["perplexity"] / q["perplexity_full"] - 1
        rows.append({"policy": str(policy), "kind": policy.kind, **q})
    return rows, logp


def decode_speed(model, prompt: np.ndarray, n: int, exit: str) -> tuple[float, dict]:
    t0 = time.perf_counter()
    model.generate_tokens(prompt.tolist(), max_new_tokens=n, ignore_eos=True, exit=exit)
    wall = time.perf_counter() - t0
    stats = model.last_stats
    d = stats.to_dict()
    return stats.decode_tok_s, {"mean_loops": stats.mean_loops if exit != "none" else model.backend.loops,
                                "speculation": d.get("speculation"), "wall_s": wall}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifact", type=Path)
    p.add_argument("--text", type=Path, required=True)
    p.add_argument("--tokens", type=int, default=4096, help="held-out tokens for the curves")
    p.add_argument("--verify-tokens", type=int, default=512)
    p.add_argument("--max-ppl", type=float, default=0.01, help="quality bound of the verified points")
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--speculate", default="1x2,1x4,2x2,2x4,3x4")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--merged-og", type=Path, help="onnxruntime-genai build of the merged twin (compare_peers)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    a = p.parse_args()

    model = edgeloop.load(a.artifact, threads=a.threads)
    loops = model.backend.loops
    ids = np.asarray(model.tokenizer.encode(a.text.read_text(encoding="utf-8")), np.int64)
    curve_ids = ids[:a.tokens]
    print(f"probing {len(curve_ids)} tokens at every boundary ...", file=sys.stderr)
    rows, _ = curves(model, curve_ids)

    # the verified point of each policy: fewest simulated loops within the bound
    best = {}
    for r in rows:
        if r["kind"] == "depth" or r["ppl_increase"] > a.max_ppl:
            continue
        if r["kind"] not in best or r["mean_loops"] < best[r["kind"]]["mean_loops"]:
            best[r["kind"]] = r
    verify_ids = ids[:a.verify_tokens + 32]
    full_lp = cal.probe(model.backend, verify_ids, min(512, model.backend.max_context))[0][-1]
    verified = []
    for kind, r in best.items():
        policy = parse_policy(r["policy"], loops=loops, gate=model.contract.model.exit_gate)
        for strategy in ("fill", "recursion"):
            q = cal.decode_quality(model, verify_ids, policy, full_lp, strategy, prompt=32)
            q["ppl_increase"] = q["perplexity"] / q["perplexity_full"] - 1
            verified.append({"policy": r["policy"], "kv_strategy": strategy, "simulated": r, **q})
            print(f"verified {r['policy']:<18} {strategy:<9} loops {q['mean_loops']:.3f}  KL {q['mean_kl']:.4f}  "
                  f"ppl {100 * q['ppl_increase']:+.2f}%", file=sys.stderr)

    # speed, interleaved
    after = ids[a.tokens:a.tokens + a.prompt_tokens]  # a prompt the curves did not read, when the text is long enough
    prompt = after if len(after) == a.prompt_tokens else ids[:a.prompt_tokens]
    modes = {"full depth (fused)": "none", f"full depth (host loop, depth:{loops})": f"depth:{loops}"}
    for v in verified:
        if v["kv_strategy"] == model.kv_strategy:
            modes[v["policy"]] = v["policy"]
    for s in [x for x in a.speculate.split(",") if x]:
        d, n = s.split("x")
        if int(d) < loops:
            modes[f"speculate:{s}"] = f"speculate:{s}"
    og = None
    if a.merged_og:
        import compare_peers as cp

        og = cp.GenaiEngine(a.merged_og, a.threads)
    samples: dict[str, list[float]] = {k: [] for k in modes}
    info: dict[str, dict] = {}
    if og:
        samples["onnxruntime-genai int4 (merged twin)"] = []
    rng = random.Random(a.seed)
    decode_speed(model, prompt, 8, "none")
    for rnd in range(a.rounds):
        order = list(samples)
        rng.shuffle(order)
        for name in order:
            if name.startswith("onnxruntime-genai"):
                og.start(prompt)
                t0 = time.perf_counter()
                og.decode(a.decode_tokens)
                samples[name].append(a.decode_tokens / (time.perf_counter() - t0))
                continue
            tok_s, extra = decode_speed(model, prompt, a.decode_tokens, modes[name])
            samples[name].append(tok_s)
            info[name] = extra
        print(f"round {rnd + 1}/{a.rounds}", file=sys.stderr)
    full = statistics.median(samples["full depth (fused)"])
    speed = []
    for name, xs in samples.items():
        tok_s = statistics.median(xs)
        speed.append({"mode": name, "tok_s": tok_s, "vs_full": tok_s / full,
                      "mean_loops": info.get(name, {}).get("mean_loops", float(loops)),
                      "speculation": info.get(name, {}).get("speculation")})

    print(f"\n{a.artifact} (B = {loops}, KV strategy {model.kv_strategy}, {a.threads} threads)\n")
    print("| policy | threshold | mean loops | mean KL | top-1 | perplexity | vs full |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['kind']} | {r['policy']} | {r['mean_loops']:.3f} | {r['mean_kl']:.4f} | "
              f"{r['top1_agreement']:.3f} | "
              f"{r['perplexity']:.2f} | {100 * r['ppl_increase']:+.2f}% |")
    print("\n| verified point | KV strategy | mean loops | mean KL | top-1 | perplexity vs full |")
    print("|---|---|---:|---:|---:|---:|")
    for v in verified:
        print(f"| {v['policy']} | {v['kv_strategy']} | {v['mean_loops']:.3f} | {v['mean_kl']:.4f} | "
              f"{v['top1_agreement']:.3f} | {100 * v['ppl_increase']:+.2f}% |")
    print("\n| mode | decode tok/s | vs full depth | mean loops | speculation acceptance |")
    print("|---|---:|---:|---:|---:|")
    for s in speed:
        acc = s["speculation"]["acceptance"] if s.get("speculation") else None
        print(f"| {s['mode']} | {s['tok_s']:.1f} | {s['vs_full']:.2f}x | {s['mean_loops']:.2f} | "
              f"{'' if acc is None else f'{acc:.2f}'} |")
    if a.json:
        a.json.write_text(json.dumps({"artifact": str(a.artifact), "loops": loops, "threads": a.threads,
                                      "tokens": int(len(curve_ids)), "curves": rows, "verified": verified,
                                      "speed": speed}, indent=1, default=float))
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for kind in ("confidence", "agreement", "entropy", "kl", "gate", "depth"):
            pts = sorted((r["mean_loops"], 100 * r["ppl_increase"]) for r in rows if r["kind"] == kind)
            if pts:
                ax1.plot(*zip(*pts), marker="o", ms=3, label=kind)
        ax1.axhline(100 * a.max_ppl, color="k", lw=0.8, ls=":")
        ax1.set_xlabel("mean loops per token")
        ax1.set_ylabel("perplexity vs full depth (%)")
        ax1.set_yscale("symlog", linthresh=1)
        ax1.set_title("quality vs depth (simulated on held-out text)")
        ax1.legend(fontsize=8)
        ax1.grid(alpha=0.3)
        names = [s["mode"] for s in speed]
        ax2.barh(names, [s["tok_s"] for s in speed])
        ax2.set_xlabel("decode tok/s (single stream)")
        ax2.invert_yaxis()
        ax2.tick_params(axis="y", labelsize=7)
        fig.tight_layout()
        fig.savefig(a.plot, dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
