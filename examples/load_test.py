"""A load generator for `edgeloop serve` (localhost only): Poisson arrivals, mixed lengths, latency.

    edgeloop serve build/kjv-2x4-onnx --port 8000 &
    python examples/load_test.py --url http://127.0.0.1:8000 --rate 4 --requests 64 --clients 8 \
        [--duration 120] [--prompt-words 4-48] [--output-tokens 16-96] [--exit depth:1-3] \
        [--json load.json] [--plot load.png]

Requests arrive as a Poisson process (exponential gaps, mean 1 / --rate seconds) and are sent by
at most --clients concurrent clients, each a streaming `/v1/completions` call with a prompt of a
random number of words (cut from --text or a built-in passage) and a random `max_tokens`
(`ignore_eos`, so the lengths are the ones asked for). The run stops after --requests requests
or --duration seconds, whichever comes first.

Reported: completed / failed / rejected (429) requests, output tokens/s, requests/s, time to
first token (TTFT) and inter-token latency (ITL) p50/p99, end-to-end latency, mean loops per
token and the exit-depth histogram (from each response's `edgeloop` block), as a table and,
with --plot, a PNG (latency CDFs and the depth histogram). It refuses any host but this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
PASSAGE = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; "
    "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. "
    "And God said, Let there be light: and there was light. And God saw the light, that it was good: and "
    "God divided the light from the darkness. And God called the light Day, and the darkness he called "
    "Night. And the evening and the morning were the first day."
)


def span(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    lo_i, hi_i = int(lo), int(hi or lo)
    if not 1 <= lo_i <= hi_i:
        raise argparse.ArgumentTypeError(f"{text!r}: want LO-HI with 1 <= LO <= HI")
    return lo_i, hi_i


async def one(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    """One streaming request: arrival-to-first-token, the gaps between tokens, the edgeloop block."""
    t0 = time.perf_counter()
    times, info, status = [], {}, 0
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            status = r.status_code
            if status != 200:
                await r.aread()
                return {"status": status, "error": r.text[:200]}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk["choices"][0].get("text"):
                    times.append(time.perf_counter())
                if "edgeloop" in chunk:
                    info = {"edgeloop": chunk["edgeloop"], "usage": chunk["usage"]}
    except httpx.HTTPError as e:  # refused, or broken mid-stream: a failed request either way
        return {"status": -1, "error": f"{type(e).__name__}: {e}"[:200]}
    end = time.perf_counter()
    return {"status": 200, "ttft": times[0] - t0 if times else end - t0, "itl": list(np.diff(times)),
            "e2e": end - t0, "tokens": info.get("usage", {}).get("completion_tokens", len(times)),
            "depths": info.get("edgeloop", {}).get("depths", [])}


async def run(a) -> dict:
    rng = random.Random(a.seed)
    words = (a.text.read_text() if a.text else PASSAGE).split()
    sem = asyncio.Semaphore(a.clients)
    limits = httpx.Limits(max_connections=a.clients + 4)
    results: list[dict] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(a.timeout), limits=limits) as client:
        model = a.model or (await client.get(a.url + "/v1/models")).json()["data"][0]["id"]

        async def client_task(body):
            async with sem:
                results.append(await one(client, a.url, body))

        tasks, start = [], time.perf_counter()
        for i in range(a.requests):
            if time.perf_counter() - start > a.duration:
                break
            n = rng.randint(*a.prompt_words)
            first = rng.randrange(0, max(1, len(words) - n))
            body = {"model": model, "prompt": " ".join(words[first:first + n]), "stream": True,
                    "max_tokens": rng.randint(*a.output_tokens), "ignore_eos": True, "temperature": 0}
            if a.exit:
                body["exit"] = a.exit
            tasks.append(asyncio.create_task(client_task(body)))
            await asyncio.sleep(rng.expovariate(a.rate))
        remaining = max(1.0, a.duration - (time.perf_counter() - start))
        done, pending = await asyncio.wait(tasks, timeout=remaining + a.timeout) if tasks else (set(), set())
        for t in pending:
            t.cancel()
        wall = time.perf_counter() - start
        metrics = (await client.get(a.url + "/metrics")).json()
    return {"results": results, "wall": wall, "server_metrics": metrics, "unfinished": len(pending)}


def summarise(out: dict) -> dict:
    ok = [r for r in out["results"] if r["status"] == 200]
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else float("nan")  # noqa: E731
    ttft, e2e = [r["ttft"] for r in ok], [r["e2e"] for r in ok]
    itl = [g for r in ok for g in r["itl"]]
    depths = Counter(d for r in ok for d in r["depths"][1:])  # the first token comes from the prompt
    tokens = sum(r["tokens"] for r in ok)
    return {"completed": len(ok), "rejected_429": sum(r["status"] == 429 for r in out["results"]),
            "failed": sum(r["status"] not in (200, 429) for r in out["results"]), "unfinished": out["unfinished"],
            "wall_s": out["wall"], "output_tok_s": tokens / out["wall"], "requests_s": len(ok) / out["wall"],
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99),
            "e2e_p50": pct(e2e, 50), "e2e_p99": pct(e2e, 99),
            "mean_loops": sum(d * c for d, c in depths.items()) / sum(depths.values()) if depths else float("nan"),
            "depth_histogram": {str(d): c for d, c in sorted(depths.items())},
            "server_rows_per_block_call": out["server_metrics"].get("mean_rows_per_block_call")}


def plot(out: dict, s: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in out["results"] if r["status"] == 200]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, values, name in ((axes[0], [r["ttft"] for r in ok], "TTFT (s)"),
                             (axes[1], [g for r in ok for g in r["itl"]], "inter-token latency (s)")):
        xs = np.sort(values)
        ax.plot(xs, np.arange(1, len(xs) + 1) / max(1, len(xs)))
        ax.set_xlabel(name)
        ax.set_ylabel("fraction")
        ax.grid(alpha=0.3)
    hist = s["depth_histogram"]
    axes[2].bar(list(hist), list(hist.values()))
    axes[2].set_xlabel("exit depth (loops)")
    axes[2].set_ylabel("tokens")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", help="model id (default: the server's)")
    p.add_argument("--rate", type=float, default=4.0, help="mean arrivals per second (Poisson)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--duration", type=float, default=300.0, help="stop sending after this many seconds")
    p.add_argument("--clients", type=int, default=8, help="concurrent requests at most")
    p.add_argument("--prompt-words", type=span, default=(4, 48))
    p.add_argument("--output-tokens", type=span, default=(16, 96))
    p.add_argument("--exit", help="exit policy sent with every request (default: the artifact's)")
    p.add_argument("--text", type=Path, help="prompt source text (default: a built-in passage)")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    a = p.parse_args()
    host = urlparse(a.url).hostname or ""
    if host not in LOCAL_HOSTS:
        print(f"error: load_test only targets this machine (localhost), not {host!r}", file=sys.stderr)
        return 2
    if a.rate <= 0 or a.requests < 1 or a.clients < 1:
        print("error: --rate, --requests and --clients must be positive", file=sys.stderr)
        return 2
    try:
        out = asyncio.run(run(a))
    except httpx.ConnectError:
        print(f"error: no server at {a.url} (start one with `edgeloop serve ARTIFACT`)", file=sys.stderr)
        return 2
    s = summarise(out)
    print("| requests (ok / 429 / failed) | output tok/s | req/s | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) | "
          "E2E p50 / p99 (s) | mean loops | rows/block call |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {s['completed']} / {s['rejected_429']} / {s['failed']} | {s['output_tok_s']:.1f} | "
          f"{s['requests_s']:.2f} | "
          f"{s['ttft_p50']:.3f} / {s['ttft_p99']:.3f} | {1e3 * s['itl_p50']:.1f} / {1e3 * s['itl_p99']:.1f} | "
          f"{s['e2e_p50']:.2f} / {s['e2e_p99']:.2f} | {s['mean_loops']:.2f} | {s['server_rows_per_block_call']} |")
    print(f"exit depths: {s['depth_histogram']}")
    errors = Counter(r["error"] for r in out["results"] if r["status"] not in (200, 429))
    for error, n in errors.most_common(3):
        print(f"failed x{n}: {error}", file=sys.stderr)
    if a.json:
        a.json.write_text(json.dumps({"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                                      "summary": s}, indent=1))
    if a.plot:
        plot(out, s, a.plot, f"{a.url}: rate {a.rate}/s, {a.clients} clients, exit {a.exit or 'artifact default'}")
    return 0 if s["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
