"""`edgeloop calibrate`: pick an exit threshold that meets a quality target against full depth.

1. **Probe** (fast, every position at once): the held-out text runs the host-driven loop at full
   depth in windows, and the head reads every loop boundary of every position. Each candidate
   policy and threshold is simulated on these per-boundary logits: where would each token leave,
   what would its distribution be (KL to full depth, top-1 agreement, perplexity)?
2. **Verify** (exact, as generation runs): the best candidates are decoded token by token,
   teacher-forced on the text, with the real exits and the artifact's KV strategy (the depths a
   token skipped hold its copied-forward state, or nothing) — what a user's run does. The first
   candidate whose measured quality meets the target is kept; the simulation only orders them.

The chosen policy, the KV strategy and the measurements go into the artifact's contract
(`edgeloop.json`, rewritten atomically with a new digest); `inspect` shows them and `run` uses
them unless a request asks for another policy.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edgeloop.errors import EdgeloopError
from edgeloop.runtimes.backend import BlockRow, Row
from edgeloop.runtimes.exits import ExitPolicy, TokenExit, log_softmax
from edgeloop.runtimes.stepping import StepRow, host_step

POLICY_GRIDS = {
    "confidence": [0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999],
    "entropy": [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0],
    "kl": [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5],
    "gate": [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99],
}


@dataclass(frozen=True)
class Target:
    max_kl: float | None = None
    min_top1: float | None = None
    max_ppl_increase: float | None = None  # relative, e.g. 0.01 = +1%

    def met(self, q: dict) -> bool:
        return ((self.max_kl is None or q["mean_kl"] <= self.max_kl)
                and (self.min_top1 is None or q["top1_agreement"] >= self.min_top1)
                and (self.max_ppl_increase is None or q["perplexity"] <= q["perplexity_full"] * (1 + self.max_ppl_increase)))

    def describe(self) -> str:
        parts = [f"mean KL <= {self.max_kl:g}" if self.max_kl is not None else "",
                 f"top-1 >= {self.min_top1:g}" if self.min_top1 is not None else "",
                 f"perplexity +{100 * self.max_ppl_increase:g}% at most" if self.max_ppl_increase is not None else ""]
        return ", ".join(p for p in parts if p)


def probe(backend, ids: np.ndarray, window: int) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """Log-probabilities [T, V] (float32) and gate scores [T] at every loop boundary (1..B), teacher-forced."""
    loops = backend.loops
    per_boundary: list[list[np.ndarray]] = [[] for _ in range(loops)]
    gates: list[list[np.ndarray]] = [[] for _ in range(loops)]
    for start in range(0, len(ids), window):
        chunk = ids[start:start + window]
        state = backend.new_state(host=True)
        h = backend.embed([Row(state, chunk)])[0]
        for r in range(loops):
            h = backend.block([BlockRow(state, h, r)], complete=True)[0]  # full depth: every position is there
            out = backend.head([h])[0]
            lp = out.logits.astype(np.float64)
            lp = lp - lp.max(-1, keepdims=True)
            lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
            per_boundary[r].append(lp.astype(np.float32))
            if out.exit_score is not None:
                gates[r].append(out.exit_score)
        backend.release(state)
    logp = [np.concatenate(x) for x in per_boundary]
    return logp, ([np.concatenate(g) for g in gates] if gates[0] else None)


def simulate(policy: ExitPolicy, logp: list[np.ndarray], gates) -> np.ndarray:
    """Exit pass (1..B) of every position under `policy`, from the probed boundaries."""
    loops, n = len(logp), len(logp[0])
    exits = np.full(n, loops)
    for i in range(n):
        memory = TokenExit(policy)
        for r in range(loops - 1):
            gate = None if gates is None else float(gates[r][i])
            if memory.decide(r + 1, logp[r][i], gate):
                exits[i] = r + 1
                break
    return exits


def quality(logp_full: np.ndarray, logp_exit: np.ndarray, ids: np.ndarray, depths: np.ndarray) -> dict:
    """KL(full || exit), top-1 agreement and perplexities over positions 0..T-2 (scored on the next token)."""
    n = len(ids) - 1
    full, got = logp_full[:n].astype(np.float64), logp_exit[:n].astype(np.float64)
    kl = float((np.exp(full) * (full - got)).sum(-1).mean())
    rows, nxt = np.arange(n), ids[1:]
    return {"mean_kl": float(f"{kl:.4g}"), "top1_agreement": round(float((full.argmax(-1) == got.argmax(-1)).mean()), 4),
            "perplexity_full": round(math.exp(-float(full[rows, nxt].mean())), 4),
            "perplexity": round(math.exp(-float(got[rows, nxt].mean())), 4),
            "mean_loops": round(float(depths[:n].mean()), 4)}


def decode_quality(model, ids: np.ndarray, policy: ExitPolicy, logp_full: np.ndarray, strategy: str,
                   prompt: int) -> dict:
    """Teacher-forced decoding with real exits: `prompt` tokens prefilled at full depth, then every next
    token fed one at a time through the host loop with the policy; quality against full depth."""
    backend = model.backend
    state = backend.new_state(host=True)
    try:
        first = host_step(backend, [StepRow(state, ids[:prompt])], strategy=strategy)[0]
        got, depths = [first.logits[-1]], [backend.loops]
        for t in ids[prompt:-1]:
            res = host_step(backend, [StepRow(state, np.array([t]), exit=TokenExit(policy))], strategy=strategy)[0]
            got.append(res.logits[-1])
            depths.append(res.depth)
    finally:
        backend.release(state)
    lp = np.stack([log_softmax(g) for g in got])
    scored = ids[prompt - 1:]
    return quality(logp_full[prompt - 1:], lp, scored, np.asarray(depths))


def candidates(kinds: list[str], loops: int, gate: bool) -> list[ExitPolicy]:
    out = []
    for kind in kinds:
        if kind == "agreement":
            out += [ExitPolicy("agreement", count=c) for c in range(loops - 1, 0, -1)]
        elif kind == "gate" and not gate:
            continue
        else:
            out += [ExitPolicy(kind, t) for t in POLICY_GRIDS[kind]]
    return out


def calibrate(model, text_ids: np.ndarray, target: Target, *, policies: list[str], strategy: str,
              verify_tokens: int = 384, progress=None) -> dict:
    backend = model.backend
    if not backend.host_loop:
        raise EdgeloopError("calibration needs the host-driven loop (a model with one looped stage)")
    if len(text_ids) < 64:
        raise EdgeloopError(f"the calibration text has {len(text_ids)} tokens; give at least 64 (a few hundred "
                            "words)")
    if backend.loops < 2:
        raise EdgeloopError("this model runs its block once: there is no loop boundary to exit at")
    window = min(512, backend.max_context)
    logp, gates = probe(backend, text_ids, window)
    spec = model.contract.model if model.contract is not None else backend.model.spec
    table = []
    for policy in candidates(policies, backend.loops, spec.exit_gate):
        depths = simulate(policy, logp, gates)
        exit_lp = np.stack([logp[d - 1][i] for i, d in enumerate(depths)])
        q = quality(logp[-1], exit_lp, text_ids, depths)
        table.append((policy, q))
    if progress:
        progress(f"simulated {len(table)} candidates on {len(text_ids)} tokens")
    # candidates that the simulation says meet the target, fewest loops first, then verified for real
    ordered = sorted([(p, q) for p, q in table if target.met(q)], key=lambda pq: pq[1]["mean_loops"])
    verify_ids = text_ids[:min(len(text_ids), verify_tokens + 32)]
    full_lp = probe(backend, verify_ids, window)[0][-1]
    chosen, measured, tried = ExitPolicy(), None, []
    for policy, simulated in ordered[:6]:
        q = decode_quality(model, verify_ids, policy, full_lp, strategy, prompt=32)
        tried.append({"policy": str(policy), "simulated": simulated, "measured": q})
        if progress:
            progress(f"{policy}: measured mean KL {q['mean_kl']}, top-1 {q['top1_agreement']}, "
                     f"perplexity {q['perplexity']} (full {q['perplexity_full']}), {q['mean_loops']} loops")
        if target.met(q) and q["mean_loops"] < backend.loops - 1e-9:
            chosen, measured = policy, q
            break
    return {"policy": str(chosen), "target": target.describe(), "tokens": int(len(text_ids)),
            "verify_tokens": int(len(verify_ids)), "kv_strategy": strategy, "measured": measured,
            "verified": tried, "simulated": [{"policy": str(p), **q} for p, q in table]}


def store(path: Path, result: dict, strategy: str, text: str) -> None:
    """Write the chosen policy into the artifact's contract (atomic, new digest)."""
    from edgeloop.runtimes.contract import MANIFEST, ExitSection, load, serialize

    path = Path(path)
    contract = load(path)
    calibration = {k: result[k] for k in ("target", "tokens", "verify_tokens", "measured")}
    calibration["text"] = text
    calibration["candidates_verified"] = [v["policy"] for v in result["verified"]]
    new = replace(contract, exit=ExitSection(result["policy"], strategy, calibration))
    raw = serialize(new)
    fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST}.", dir=path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path / MANIFEST)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
