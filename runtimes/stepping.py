"""The host-driven loop: one step of many rows, each leaving the loop when its exit policy says so.

`host_step` runs a batch of rows through the looped block one pass at a time: the rows still in
the loop share every block call, whatever their history; at each loop boundary the head probes
the rows whose policy needs it, and a row that exits leaves the batch with the logits of that
boundary. Prompt rows (several tokens) always run every pass.

What the depths a token skipped hold (the KV strategy, docs/early-exit.md):
- "fill": its exit hidden state is copied forward: the K/V each skipped depth would store are
  computed from it (`kv_fill`: the layers' input norm and k/v projections only), so later
  tokens attend to every position at every depth;
- "recursion": nothing (Mixture-of-Recursions' recursion-wise caching): a deeper depth attends
  only to the positions that reached it.

`speculate` drafts tokens at a shallow depth and verifies them at full depth in one block pass
per remaining depth (greedy: the output equals full depth; sampling: the rejection rule keeps the
full model's distribution).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from edgeloop.errors import EdgeloopError
from edgeloop.runtimes.backend import BlockRow, Row, RowOutput
from edgeloop.runtimes.exits import ExitPolicy, TokenExit


@dataclass
class StepRow:
    state: object
    tokens: np.ndarray
    exit: TokenExit | None = None  # None: every pass (prompts)
    cap: int | None = None  # at most this many passes (--loops)
    all_logits: bool = False
    keep_hidden: bool = False  # return the hidden state of the last pass run (speculation)


@dataclass
class StepResult(RowOutput):
    hidden: np.ndarray | None = None
    exits: list[float] = field(default_factory=list)


def host_step(backend, rows: Sequence[StepRow], *, strategy: str = "fill",
              complete: bool | None = None) -> list[StepResult]:
    """One token (or prompt) of each row through the loop, each leaving at its own exit.
    complete: every earlier position holds K/V at every depth the rows reach (default: the fill
    strategy guarantees it; recursion-wise attention leaves holes)."""
    loops = backend.loops
    complete = strategy == "fill" if complete is None else complete
    hidden = backend.embed([Row(r.state, r.tokens) for r in rows])
    out: list[StepResult | None] = [None] * len(rows)
    live = list(range(len(rows)))
    for p in range(loops):
        new = backend.block([BlockRow(rows[i].state, hidden[i], p) for i in live], complete=complete)
        for i, h in zip(live, new):
            hidden[i] = h
        last = p == loops - 1
        probe, leaving = [], set()
        for i in live:
            row = rows[i]
            if last or (row.cap is not None and row.cap <= p + 1):
                leaving.add(i)
            elif row.exit is not None and row.exit.policy.exits:
                if row.exit.needs_logits():
                    probe.append(i)
                    continue
                if row.exit.decide(p + 1, None, None):  # a forced depth: the head only where it leaves
                    leaving.add(i)
            if i in leaving:
                probe.append(i)
        if probe:
            heads = backend.head([hidden[i] if rows[i].all_logits else hidden[i][-1:] for i in probe])
            for i, h in zip(probe, heads):
                row = rows[i]
                done = i in leaving
                if not done:
                    gate = None if h.exit_score is None else float(h.exit_score[-1])
                    done = row.exit.decide(p + 1, h.logits[-1], gate)
                if done:
                    out[i] = StepResult(h.logits, p + 1, h.exit_score, hidden[i] if row.keep_hidden else None)
        exited = [i for i in live if out[i] is not None and not last]
        if exited and strategy == "fill":
            backend.kv_fill([BlockRow(rows[i].state, hidden[i], d) for i in exited for d in range(p + 1, loops)])
        live = [i for i in live if out[i] is None]
        if not live:
            break
    for r in rows:
        backend.advance(r.state, len(r.tokens))
    return out


# ---------------------------------------------------------------------------------------------
# self-speculative decoding


@dataclass
class Speculation:
    """Counters of one request's drafts (the acceptance rate is accepted / drafted)."""

    drafted: int = 0
    accepted: int = 0
    rounds: int = 0


def speculate(backend, state, last_token: int, policy: ExitPolicy, sampler, history: list[int],
              *, budget: int) -> tuple[list[int], list[int], Speculation]:
    """Draft up to policy.count tokens at policy.draft_depth passes each, then verify them at full depth:
    one block call per remaining depth carries every draft. Returns (tokens, passes of each token,
    counters): the accepted drafts, then — at the first rejection — the full model's own token.

    The verify pass continues the fed tokens (the last token and every draft but the last) from their
    draft-depth hidden states, writing their deeper K/V; the full-depth logits at fed position j judge
    draft j. The cache then keeps the positions whose tokens were accepted (the rest is forgotten)."""
    loops, depth = backend.loops, policy.draft_depth
    start = state.length
    n = max(1, min(policy.count, budget))
    drafts, draft_hidden, draft_logits = [], [], []
    token = last_token
    for _ in range(n):  # `depth` passes per draft token; the deeper depths wait for the verify pass
        res = host_step(backend, [StepRow(state, np.array([token]), cap=depth, keep_hidden=True)],
                        strategy="recursion", complete=True)[0]  # drafts stop short; the verify completes them
        draft_hidden.append(res.hidden[-1])
        draft_logits.append(res.logits[-1])
        token = sampler.draft(res.logits[-1], history + drafts)
        drafts.append(token)
    x = np.stack(draft_hidden)  # [n, H]: fed tokens (last_token, drafts[:-1]) after `depth` passes
    for p in range(depth, loops):
        x = backend.block([BlockRow(state, x, p, position=start)], complete=True)[0]
    full = backend.head([x])[0].logits  # [n, V]
    out: list[int] = []
    accepted = 0
    for j, d in enumerate(drafts):
        ok, tok = sampler.verify(full[j], draft_logits[j], d, history + out)
        out.append(tok)
        if not ok:
            break
        accepted += 1
    kept = len(out)  # positions complete at every depth: the fed tokens up to the last accepted one
    backend.rewind(state, start + kept)
    passes = [depth] * accepted + [loops] * (len(out) - accepted)
    return out, passes, Speculation(n, accepted, 1)


def check_host_backend(backend) -> None:
    if not getattr(backend, "host_loop", False):
        raise EdgeloopError("early exit needs the host-driven loop, which this model does not have (it has "
                            "more than one looped stage: use CYCLE sharing); run with --exit none")
