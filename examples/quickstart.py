"""edgeloop from Python: convert the bundled model, compile it, generate and stream.

    python examples/quickstart.py [--loops 4] [--lora-rank 32] [--layout loop]

Needs the convert extra for the first two steps; the last part runs on the base install.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import edgeloop

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=HERE / "kjv-tiny", help="Hugging Face checkpoint")
    p.add_argument("--out", type=Path, default=Path("build/quickstart"))
    p.add_argument("--loops", type=int, default=4)
    p.add_argument("--lora-rank", default="32")
    p.add_argument("--layout", default="loop", choices=["loop", "unrolled"])
    p.add_argument("--prompt", default="And God said unto Moses")
    args = p.parse_args()

    # 1. 8 layers -> 2 shared blocks looped 4 times, with a per-depth rank-32 LoRA.
    result = edgeloop.convert(args.model, args.out / "model", loops=args.loops, lora_rank=args.lora_rank,
                              init="average", overwrite=True)
    print(f"converted: {result.params.total:,} parameters ({result.params.compression:.2f}x smaller)")

    # 2. The shared block is lowered once, inside an ONNX Loop.
    edgeloop.compile(args.out / "model", args.out / "artifact", layout=args.layout, overwrite=True)

    # 3. Run it: numpy + onnxruntime + tokenizers only.
    m = edgeloop.load(args.out / "artifact")
    heldout = (args.model / "heldout.txt").read_text(encoding="utf-8")[:4000]
    print(f"held-out perplexity: {m.perplexity(heldout):.1f} (original: {edgeloop.load(args.model).perplexity(heldout):.1f})")
    print("greedy:", m.generate(args.prompt, max_new_tokens=32, repetition_penalty=1.3))
    print("sampled: ", end="")
    for piece in m.stream(args.prompt, max_new_tokens=48, temperature=0.8, top_p=0.95, seed=0):
        print(piece, end="", flush=True)
    s = m.last_stats
    print(f"\n[{s.prefill_s * 1000:.0f} ms to first token, {s.decode_tok_s:.0f} tok/s decode]")


if __name__ == "__main__":
    main()
