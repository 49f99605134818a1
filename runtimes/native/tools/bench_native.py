"""Native runtime vs the Python runtime on the same TVM CPU artifact (numbers for docs/native.md).

    .venv/bin/python runtimes/native/tools/bench_native.py ARTIFACT --cli build/native/edgeloop-cli \
        [--threads 1] [--tokens 128] [--repeats 5] [--prompt TEXT] [--exit POLICY]

Each measurement runs in a fresh process (so peak RSS is that runtime's alone), alternating native
and Python, greedy with ignore_eos. Reports, as medians: load time, time to first token after load,
load-to-first-token, decode tokens/s, peak RSS. TVM's thread pool is set to --threads in both
(TVM_NUM_THREADS and runtime.config_threadpool). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

PY_RUN = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import edgeloop
model = edgeloop.load(sys.argv[1], threads=int(sys.argv[2]))
load_s = time.perf_counter() - t0
model.generate(sys.argv[4], max_new_tokens=int(sys.argv[3]), ignore_eos=True, exit=sys.argv[5] or None)
s = model.last_stats
print(json.dumps({"load_s": load_s, "ttft_s": s.prefill_s, "decode_tok_s": s.decode_tok_s,
                  "new_tokens": s.new_tokens, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def native(cli: str, artifact: str, threads: int, tokens: int, prompt: str, policy: str) -> dict:
    r = subprocess.run([cli, artifact, "-p", prompt, "-n", str(tokens), "--ignore-eos", "--json", "--threads",
                        str(threads), *(["--exit", policy] if policy else [])], capture_output=True, text=True,
                       check=True,
                       env={**os.environ, "TVM_NUM_THREADS": str(threads)})
    d = json.loads(r.stdout)
    return {"load_s": d["load_s"], "ttft_s": d["time_to_first_token_s"], "decode_tok_s": d["decode_tok_s"],
            "new_tokens": d["new_tokens"], "peak_rss_mb": d["peak_rss_mb"]}


def python(artifact: str, threads: int, tokens: int, prompt: str, policy: str) -> dict:
    r = subprocess.run([sys.executable, "-c", PY_RUN, artifact, str(threads), str(tokens), prompt, policy],
                       capture_output=True,
                       text=True, check=True, env={**os.environ, "TVM_NUM_THREADS": str(threads)})
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--cli", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt", default="And God said unto Moses")
    ap.add_argument("--exit", default="", help="exit policy for both runtimes (default: the artifact's)")
    a = ap.parse_args()
    runs: dict[str, list[dict]] = {"native": [], "python": []}
    for _ in range(a.repeats):
        runs["native"].append(native(a.cli, a.artifact, a.threads, a.tokens, a.prompt, a.exit))
        runs["python"].append(python(a.artifact, a.threads, a.tokens, a.prompt, a.exit))
    flags = ""
    try:
        flags = " ".join(f for f in open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0].split()
                         if f.startswith(("avx", "fma", "amx")))
    except (OSError, IndexError):
        pass
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {a.threads} thread(s), "
          f"{a.tokens} new tokens, exit {a.exit or 'default'}, median of {a.repeats}; cpu flags: {flags}")
    print("| runtime | load s | time to first token s | load to first token s | decode tok/s | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    out = {}
    for name, rs in runs.items():
        m = {k: statistics.median(r[k] for r in rs) for k in ("load_s", "ttft_s", "decode_tok_s", "peak_rss_mb")}
        m["load_to_first_token_s"] = statistics.median(r["load_s"] + r["ttft_s"] for r in rs)
        out[name] = m
        print(f"| {name} | {m['load_s']:.3f} | {m['ttft_s']:.4f} | {m['load_to_first_token_s']:.3f} | "
              f"{m['decode_tok_s']:.1f} | {m['peak_rss_mb']:.0f} |")
    print(f"native / python decode speed: {out['native']['decode_tok_s'] / out['python']['decode_tok_s']:.2f}x")


if __name__ == "__main__":
    main()
