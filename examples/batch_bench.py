"""Aggregate decode throughput with several sequences stepping together, edgeloop against onnxruntime-genai.

    python examples/batch_bench.py --models kjv,smollm-135m --loops 2 --batch 1,4,8 --threads 2 \\
        --rounds 3 --work /tmp/cmp --json docs/results/batch.json

Per model (prepared as in compare_peers.py: the original checkpoint, the recursive model with
--lora-rank, its merged vanilla twin, the int4 artifacts and onnxruntime-genai's int4 build of the
merged twin), every engine is measured at every batch size, interleaved in a shuffled order each
round, in one process:

    el-fused   edgeloop int4 artifact (unrolled layout, int4 + embeddings): one fused-graph call per step
    el-host    the same artifact through the host-driven loop: embed, B block passes, head per step
               (every row at full depth: what early exit and depth-wise batching run on)
    el-tvm     edgeloop TVM CPU artifact (fp32), fused functions (with --tvm)
    og         onnxruntime-genai int4 on the merged twin, batch_size = b (one generator)

Each measurement prefills b prompts of --context tokens (held-out text, a different window per
row) and times --steps greedy decode steps of all b rows: aggregate tok/s = b * steps / time.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_peers as cp  # noqa: E402  (model preparation is shared)


class EdgeloopBatch:
    def __init__(self, path: Path, threads: int, host: bool):
        import edgeloop

        self.model = edgeloop.load(path, threads=threads)
        self.backend, self.host = self.model.backend, host

    def measure(self, prompts: list[np.ndarray], steps: int) -> float:
        from edgeloop.runtimes.backend import BlockRow, Row

        b = self.backend
        b.reserve(len(prompts))
        states = [b.new_state(host=self.host) for _ in prompts]

        def step(tokens):
            rows = [Row(s, np.asarray(t)) for s, t in zip(states, tokens)]
            if not self.host:
                return [int(np.argmax(o.logits[-1])) for o in b.step(rows)]
            hidden = b.embed(rows)
            for r in range(b.loops):
                hidden = b.block([BlockRow(s, h, r) for s, h in zip(states, hidden)], complete=True)
            for s, t in zip(states, tokens):
                b.advance(s, len(t))
            return [int(np.argmax(o.logits[-1])) for o in b.head([h[-1:] for h in hidden])]

        nxt = step(prompts)
        start = time.perf_counter()
        for _ in range(steps):
            nxt = step([[t] for t in nxt])
        elapsed = time.perf_counter() - start
        for s in states:
            b.release(s)
        return len(prompts) * steps / elapsed


class GenaiBatch:
    def __init__(self, path: Path, threads: int):
        self.engine = cp.GenaiEngine(path, threads)

    def measure(self, prompts: list[np.ndarray], steps: int) -> float:
        og, e = self.engine.og, self.engine
        params = og.GeneratorParams(e.model)
        params.set_search_options(max_length=min(e.max_length, len(prompts[0]) + steps + 8), do_sample=False,
                                  batch_size=len(prompts))
        gen = og.Generator(e.model, params)
        gen.append_tokens(np.stack(prompts).astype(np.int32))
        gen.generate_next_token()
        start = time.perf_counter()
        for _ in range(steps):
            gen.generate_next_token()
        elapsed = time.perf_counter() - start
        del gen
        return len(prompts) * steps / elapsed


def run_model(name: str, args) -> list[dict]:
    prep = cp.Prepared(name, Path(args.work), args)
    results = []
    for loops in args.loops:
        engines = {
            "el-fused": lambda: EdgeloopBatch(prep.artifact(loops, "el-unrolled-int4"), args.threads, host=False),
            "el-host": lambda: EdgeloopBatch(prep.artifact(loops, "el-unrolled-int4"), args.threads, host=True),
            "og": lambda: GenaiBatch(prep.genai(loops, "og-merged-int4"), args.threads),
        }
        if args.tvm:
            engines["el-tvm"] = lambda: EdgeloopBatch(prep.artifact(loops, "el-tvm-fp32"), args.threads, host=False)
        loaded = {k: make() for k, make in engines.items()}
        vocab = json.loads((prep.orig / "config.json").read_text())["vocab_size"]
        text = cp.prompt_ids(prep.orig, args.context * max(args.batch) + args.context, vocab)
        prompts = [text[i * args.context:(i + 1) * args.context] for i in range(max(args.batch))]
        samples: dict = {(k, b): [] for k in loaded for b in args.batch}
        rng = random.Random(args.seed)
        for rnd in range(args.rounds):
            order = list(samples)
            rng.shuffle(order)
            for engine, b in order:
                samples[(engine, b)].append(loaded[engine].measure(prompts[:b], args.steps))
            cp.log(f"[{name} B={loops}] round {rnd + 1}/{args.rounds}")
        for (engine, b), xs in samples.items():
            results.append({"model": name, "loops": loops, "engine": engine, "batch": b, "threads": args.threads,
                            "tok_s": cp.stats(xs)})
        del loaded
    return results


def table(results: list[dict]) -> str:
    lines = ["| model | B | engine | " + " | ".join(f"batch {b}" for b in sorted({r['batch'] for r in results}))
             + " | batch 4 / 1 | batch 8 / 1 |", "|---" * (6 + len({r['batch'] for r in results})) + "|"]
    keys = sorted({(r["model"], r["loops"], r["engine"]) for r in results})
    for model, loops, engine in keys:
        row = {r["batch"]: r["tok_s"]["median"] for r in results if (r["model"], r["loops"], r["engine"]) ==
               (model, loops, engine)}
        ratio = lambda b: f"{row[b] / row[1]:.2f}x" if b in row and 1 in row else "-"  # noqa: E731
        lines.append(f"| {model} | {loops} | {engine} | " + " | ".join(f"{row[b]:.1f}" for b in sorted(row))
                     + f" | {ratio(4)} | {ratio(8)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    ap.add_argument("--models", default="kjv")
    ap.add_argument("--loops", type=ints, default=[4])
    ap.add_argument("--lora-rank", type=int, default=32)
    ap.add_argument("--max-layers", type=int, default=None)
    ap.add_argument("--batch", type=ints, default=[1, 4, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tvm", action="store_true", help="also the TVM CPU artifact")
    ap.add_argument("--calibration-text", default=None)
    ap.add_argument("--work", default="/tmp/edgeloop-cmp")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    results = []
    for name in args.models.split(","):
        results += run_model(name, args)
    print(table(results))
    if args.json:
        machine = {"python": platform.python_version(), "cpu": cp.cpu_name() if hasattr(cp, "cpu_name") else
                   platform.processor(), "threads": args.threads}
        Path(args.json).write_text(json.dumps({"args": vars(args), "machine": machine, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
