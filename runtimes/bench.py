"""`edgeloop bench`: prefill latency, decode tok/s at several contexts, peak RSS.

Several models given together are measured in one process, interleaved in a shuffled order
each round, so that machine noise hits them alike (DESIGN.md: benchmark hygiene). Peak RSS is
measured per model in a fresh subprocess, where it means something.
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeloop.runtimes.backend import Row


@dataclass
class BenchConfig:
    prefill_tokens: int = 128
    contexts: tuple[int, ...] = (128, 1024)
    decode_steps: int = 32
    rounds: int = 3
    threads: int | None = None
    seed: int = 0
    rss: bool = True
    batches: tuple[int, ...] = (1,)


@dataclass
class BenchResult:
    name: str
    path: str
    backend: str
    prefill_ms: list[float] = field(default_factory=list)
    decode_tok_s: dict[int, list[float]] = field(default_factory=dict)
    batch_tok_s: dict[int, list[float]] = field(default_factory=dict)  # batch size -> aggregate decode tok/s
    peak_rss_mb: float | None = None
    bytes_on_disk: int = 0

    def summary(self) -> dict:
        def stats(xs):
            return {"min": round(min(xs), 3), "median": round(statistics.median(xs), 3), "max": round(max(xs), 3)}

        return {"name": self.name, "path": self.path, "backend": self.backend,
                "prefill_ms": stats(self.prefill_ms),
                "decode_tok_s": {str(c): stats(v) for c, v in self.decode_tok_s.items()},
                "batch_decode_tok_s": {str(b): stats(v) for b, v in self.batch_tok_s.items()},
                "peak_rss_mb": self.peak_rss_mb, "bytes_on_disk": self.bytes_on_disk}


def _load(path: str, threads: int | None):
    import edgeloop

    options = {"threads": threads} if threads and (Path(path) / "edgeloop.json").is_file() else {}
    model = edgeloop.load(path, **options)
    if not options and threads and model.backend.name == "reference":
        import torch

        torch.set_num_threads(threads)
    return model


def _tokens(model, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, model.backend.vocab_size, size=n).astype(np.int64)


def measure_prefill(model, tokens: np.ndarray) -> float:
    backend = model.backend
    state = backend.new_state()
    start = time.perf_counter()
    backend.step([Row(state, tokens)])
    elapsed = (time.perf_counter() - start) * 1000
    backend.release(state)
    return elapsed


def measure_decode(model, context: int, steps: int, seed: int, batch: int = 1) -> float:
    """Aggregate tok/s of `steps` decode steps of `batch` sequences stepping together after a
    `context`-token prefix each."""
    backend = model.backend
    states = [backend.new_state() for _ in range(batch)]
    for i, state in enumerate(states):
        backend.step([Row(state, _tokens(model, context, seed + 17 * i))])
    tokens = _tokens(model, steps * batch, seed + 1).reshape(steps, batch)
    start = time.perf_counter()
    for row in tokens:
        backend.step([Row(s, t.reshape(1)) for s, t in zip(states, row)])
    elapsed = time.perf_counter() - start
    for state in states:
        backend.release(state)
    return steps * batch / elapsed


def peak_rss_mb(path: str, config: BenchConfig) -> float:
    """Peak resident memory of a fresh process that loads `path` and runs a prefill + decode."""
    code = (
        "import sys, numpy as np\n"
        "from edgeloop.runtimes.bench import _load, _tokens\n"
        f"m = _load({path!r}, {config.threads!r})\n"
        "from edgeloop.runtimes.backend import Row\n"
        "s = m.backend.new_state()\n"
        f"m.backend.step([Row(s, _tokens(m, {config.prefill_tokens}, 0))])\n"
        "for t in _tokens(m, 8, 1): m.backend.step([Row(s, t.reshape(1))])\n"
        # VmHWM, not ru_maxrss: Linux carries the parent's ru_maxrss across fork + exec
        "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode != 0:
        return float("nan")
    return round(float(res.stdout.strip().splitlines()[-1]), 1)


def run_bench(paths: list[str], config: BenchConfig, names: list[str] | None = None, progress=None) -> list[BenchResult]:
    from edgeloop.fileio import dir_size

    names = names or [Path(p).name for p in paths]
    models = [_load(p, config.threads) for p in paths]
    for m in models:
        if max(max(config.contexts) + config.decode_steps, config.prefill_tokens) > m.backend.max_context:
            from edgeloop.errors import EdgeloopError

            raise EdgeloopError(f"context {max(config.contexts)} + {config.decode_steps} steps (or the prefill of "
                                f"{config.prefill_tokens}) exceeds {m.path}'s maximum of {m.backend.max_context}; "
                                "pass smaller --contexts / --prefill-tokens")
    results = [BenchResult(n, str(p), m.backend.name, bytes_on_disk=dir_size(p))
               for n, p, m in zip(names, paths, models)]
    rng = random.Random(config.seed)
    for m in models:  # warm-up: first-run allocations and prepacking are not what we measure
        measure_prefill(m, _tokens(m, config.prefill_tokens, config.seed))
    for round_ in range(config.rounds):
        order = list(range(len(models)))
        rng.shuffle(order)
        for i in order:
            m, r = models[i], results[i]
            r.prefill_ms.append(measure_prefill(m, _tokens(m, config.prefill_tokens, config.seed + round_)))
            for c in config.contexts:
                r.decode_tok_s.setdefault(c, []).append(measure_decode(m, c, config.decode_steps, config.seed))
            for b in config.batches:
                if b > 1:
                    r.batch_tok_s.setdefault(b, []).append(
                        measure_decode(m, config.contexts[0], config.decode_steps, config.seed, batch=b))
        if progress:
            progress(round_ + 1)
    if config.rss:
        for r in results:
            r.peak_rss_mb = peak_rss_mb(r.path, config)
    return results


def plot(results: list[BenchResult], out: Path) -> None:
    from edgeloop.errors import EdgeloopError

    try:
        _plot(results, out)
    except OSError as e:
        raise EdgeloopError(f"cannot write the plot {out}: {e.strerror}") from None


def _plot(results: list[BenchResult], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        contexts = sorted(r.decode_tok_s)
        ax.plot(contexts, [statistics.median(r.decode_tok_s[c]) for c in contexts], marker="o", label=r.name)
    ax.set_xlabel("context length (tokens already in the KV cache)")
    ax.set_ylabel("decode tokens / s (median)")
    ax.set_title("edgeloop decode speed")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def to_json(results: list[BenchResult], config: BenchConfig) -> str:
    import platform

    machine = {"python": platform.python_version(), "machine": platform.machine(), "cpus": _cpu_count()}
    return json.dumps({"config": config.__dict__, "machine": machine, "results": [r.summary() for r in results]},
                      default=list)


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
