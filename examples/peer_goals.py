"""Issue 7's goals from `compare_peers.py --json` results: a markdown table and a ratio plot.

    python examples/peer_goals.py kjv.json smollm.json qwen.json tinyllama.json --plot docs/peers-goals.png

For every model, loop count B and thread count, against onnxruntime-genai int4 on the merged
equivalent checkpoint (`og-merged-int4`, the fair peer): decode tok/s ratios of edgeloop's int4
unrolled artifact (fp32 LoRA, int8 LoRA) and of the strict twin (no LoRA) at each context; file
size ratios; and the LoRA's share of decode time, 1 - relaxed / strict tok/s.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

PEER = "og-merged-int4"
OURS = {"el-unrolled-int4": "fp32 LoRA", "el-unrolled-int4-i8lora": "int8 LoRA", "el-strict-unrolled-int4": "strict"}


def rows(results: list[dict]):
    """(model, B, threads, {engine: record}) for every group that has the peer."""
    groups: dict[tuple, dict] = {}
    for r in results:
        if "decode_tok_s" in r and r.get("loops"):
            groups.setdefault((r["model"], r["loops"], r["threads"]), {})[r["engine"]] = r
    for (model, loops, threads), engines in groups.items():
        if PEER in engines and "el-unrolled-int4" in engines:
            yield model, loops, threads, engines


def tok(r: dict | None, c: str) -> float:
    return r["decode_tok_s"][c]["median"] if r and c in r["decode_tok_s"] else math.nan


def table(groups) -> str:
    out = ["| model | B | threads | decode vs peer @128 / 512 / 1024: fp32 LoRA | int8 LoRA | strict | "
           "size vs peer: fp32 LoRA / int8 LoRA / strict | LoRA share of decode: fp32 LoRA | int8 LoRA |",
           "|---|---|---|---|---|---|---|---|---|"]
    for model, loops, threads, e in groups:
        peer, strict = e[PEER], e.get("el-strict-unrolled-int4")
        cs = [c for c in ("128", "512", "1024") if c in peer["decode_tok_s"]]

        def ratio(name):
            return " / ".join(f"{tok(e.get(name), c) / tok(peer, c):.2f}" for c in cs) if name in e else "-"

        def share(name):
            if name not in e or strict is None:
                return "-"
            return " / ".join(f"{100 * (1 - tok(e[name], c) / tok(strict, c)):.0f}%" for c in cs)

        size = " / ".join(f"{e[n]['bytes_on_disk'] / peer['bytes_on_disk']:.2f}" if n in e else "-" for n in OURS)
        out.append(f"| {model} | {loops} | {threads} | {ratio('el-unrolled-int4')} | {ratio('el-unrolled-int4-i8lora')} "
                   f"| {ratio('el-strict-unrolled-int4')} | {size} | {share('el-unrolled-int4')} "
                   f"| {share('el-unrolled-int4-i8lora')} |")
    return "\n".join(out)


def plot(groups, path: Path, context: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in groups if g[2] == 1] or groups  # one thread count keeps the plot readable
    labels = [f"{m}\nB={b}" for m, b, _, _ in groups]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    width = 0.8 / len(OURS)
    for i, (name, what) in enumerate(OURS.items()):
        ys = [tok(e.get(name), context) / tok(e[PEER], context) for _, _, _, e in groups]
        ax.bar([x + (i - 1) * width for x in range(len(groups))], ys, width, label=f"edgeloop int4, {what}")
    ax.axhline(1.0, color="black", linewidth=1, label="onnxruntime-genai int4, merged model")
    ax.set_xticks(range(len(groups)), labels, fontsize=8)
    ax.set_ylabel(f"decode tok/s at {context} vs peer")
    ax.set_title(f"edgeloop vs onnxruntime-genai (merged equivalent), threads={groups[0][2]}, median")
    ax.set_ylim(0, max(1.3, ax.get_ylim()[1] + 0.25))
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", type=Path, help="compare_peers.py --json files")
    ap.add_argument("--plot", type=Path, help="write a PNG of decode ratios here")
    ap.add_argument("--plot-context", default="128")
    args = ap.parse_args()
    groups = [g for f in args.results for g in rows(json.loads(f.read_text())["results"])]
    print(table(groups))
    if args.plot:
        plot(groups, args.plot, args.plot_context)


if __name__ == "__main__":
    main()
