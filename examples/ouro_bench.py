"""Ouro-1.4B shape: what skipping loop steps buys, next to the PyTorch reference running every step.

    python examples/ouro_bench.py --work /tmp/ouro14 [--backend tvm|onnxruntime] [--threads 1,2]
        [--tokens 16] [--json OUT]

Builds (once, cached under --work) a random-weight checkpoint with the shape of ByteDance's
Ouro-1.4B (24 layers x 4 steps, hidden 2048, MHA 16 x 128, vocab 49152, untied head, exit gate),
converts it and compiles it to an int4 artifact (`--backend tvm`, the default: the shared layers
int4, round-to-nearest since the weights are random; `--backend onnxruntime` compiles at a peak
of about 17.6 GB at this size). Then, per thread count, each engine runs in its own process (so peak RSS is its
own):

- edgeloop int4, every step on the fused graph (`--exit none`, what the published code computes);
- edgeloop int4 through the host loop at forced depths 4, 3, 2, 1 (`--exit depth:D`): the speed an
  exit gate can buy, including the cost of filling the skipped steps' KV;
- the cost of the gate per step: one epilogue call (final norm, LM head and gate) against one
  block pass, and the gate's share of the epilogue's arithmetic;
- the PyTorch reference (fp32, every step): what `transformers` with the published modeling code
  computes per token.

Greedy decode of --tokens tokens after a 32-token prompt; decode tok/s excludes the prefill.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def prepare(work: Path, backend: str = "tvm") -> tuple[Path, Path]:
    import edgeloop
    from edgeloop.presets import OURO_1_4B, make_ouro_checkpoint

    hf, md, art = work / "hf", work / "md", work / f"{backend}-int4"
    if not (hf / "config.json").is_file():
        print(f"[prep] random Ouro-1.4B-shape checkpoint -> {hf}", file=sys.stderr)
        make_ouro_checkpoint(hf, OURO_1_4B)
    if not (md / "config.json").is_file():
        print(f"[prep] convert -> {md}", file=sys.stderr)
        edgeloop.convert(hf, md)
    if not (art / "edgeloop.json").is_file():
        print(f"[prep] compile int4 ({backend}) -> {art}", file=sys.stderr)
        if backend == "tvm":  # the shared layers int4, embeddings and LM head float32
            edgeloop.compile(md, art, backend="tvm", quant="int4", scale_search=False)
        else:  # ~17.6 GB peak at 1.4B (one entry point at a time): docs/ouro.md
            edgeloop.compile(md, art, quant="int4", quantize_embeddings=True, scale_search=False, optimize=False)
    return md, art


def measure(engine: str, path: Path, threads: int, tokens: int) -> dict:
    import edgeloop

    prompt = list(range(100, 132))
    out: dict = {"engine": engine, "threads": threads}
    if engine == "reference":
        import torch

        torch.set_num_threads(threads)
        m = edgeloop.load(path)
        m.generate_tokens(prompt, max_new_tokens=tokens, ignore_eos=True, exit="none")
        out["modes"] = {"reference fp32, every step": m.last_stats.decode_tok_s}
    else:
        m = edgeloop.load(path, threads=threads)
        m.generate_tokens(prompt, max_new_tokens=2, ignore_eos=True)  # sessions loaded
        kind = m.contract.backend
        modes = {f"{kind} int4 fused, every step (--exit none)": "none"}
        modes.update({f"{kind} int4 host loop, depth:{d}": f"depth:{d}" for d in (4, 3, 2, 1)})
        out["modes"] = {}
        for name, policy in modes.items():
            m.generate_tokens(prompt, max_new_tokens=tokens, ignore_eos=True, exit=policy)
            out["modes"][name] = m.last_stats.decode_tok_s
        out.update(gate_cost(m))
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def gate_cost(m) -> dict:
    """ms per block pass and per epilogue (head + gate) call for one decode row."""
    from edgeloop.runtimes.backend import BlockRow, Row

    b = m.backend
    state = b.new_state(host=True)
    h = b.embed([Row(state, np.arange(100, 132))])[0]
    for d in range(b.loops):
        h = b.block([BlockRow(state, h, d)], complete=True)[0]
    b.advance(state, 32)
    x = b.embed([Row(state, np.array([7]))])[0]

    def timed(f, n=5):
        f()
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        return (time.perf_counter() - t0) / n * 1e3

    block_ms = timed(lambda: b.block([BlockRow(state, x, 1)], complete=True))
    head_ms = timed(lambda: b.head([x]))
    b.release(state)
    # the gate itself: one dot product of the hidden size (plus a sigmoid) next to the LM head's
    # vocab x hidden matmul in the same epilogue call
    spec = b.contract.model
    return {"block_pass_ms": block_ms, "epilogue_ms": head_ms,
            "gate_share_of_epilogue_flops": spec.hidden_size / (spec.hidden_size * (spec.vocab_size + 1))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/ouro14"))
    p.add_argument("--threads", default="1,2")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--backend", default="tvm", choices=["tvm", "onnxruntime"])
    p.add_argument("--json", type=Path)
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--one-threads", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.measure:  # a child: one engine, one thread count
        print(json.dumps(measure(a.measure, a.path, a.one_threads, a.tokens)))
        return 0
    a.work.mkdir(parents=True, exist_ok=True)
    md, art = prepare(a.work, a.backend)
    size = sum(f.stat().st_size for f in art.iterdir() if f.is_file())
    results = []
    for threads in [int(t) for t in a.threads.split(",")]:
        for engine, path in (("edgeloop", art), ("reference", md)):
            print(f"[run] {engine}, {threads} thread(s)", file=sys.stderr)
            r = subprocess.run([sys.executable, __file__, "--measure", engine, "--path", str(path), "--one-threads",
                                str(threads), "--tokens", str(a.tokens)], capture_output=True, text=True)
            if r.returncode != 0:
                print(r.stderr[-2000:], file=sys.stderr)
                return 1
            results.append(json.loads(r.stdout.strip().splitlines()[-1]))
    print(f"\nOuro-1.4B shape (random weights), int4 artifact {size / 1e9:.2f} GB, {a.tokens} tokens after a "
          "32-token prompt\n")
    print("| engine / mode | threads | decode tok/s | vs every step (fused) | peak RSS (MB) |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        full = next(iter(results_for(results, "edgeloop", r["threads"])["modes"].values()))
        for name, tok_s in r["modes"].items():
            print(f"| {name} | {r['threads']} | {tok_s:.2f} | {tok_s / full:.2f}x | {r['peak_rss_mb']:.0f} |")
    print("\n| threads | block pass: 24 layers (ms) | epilogue: final norm + LM head + gate (ms) | gate's share of "
          "the epilogue's flops |")
    print("|---:|---:|---:|---:|")
    for r in results:
        if r["engine"] == "edgeloop":
            print(f"| {r['threads']} | {r['block_pass_ms']:.1f} | {r['epilogue_ms']:.2f} | "
                  f"{100 * r['gate_share_of_epilogue_flops']:.4f}% |")
    if a.json:
        a.json.write_text(json.dumps({"artifact_bytes": size, "tokens": a.tokens, "results": results}, indent=1))
    return 0


def results_for(results, engine, threads):
    return next(r for r in results if r["engine"] == engine and r["threads"] == threads)


if __name__ == "__main__":
    sys.exit(main())
