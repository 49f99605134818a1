"""The scheduling engine: many requests, one shared block, rows at any depth.

Requests wait in a FIFO queue and are admitted while the engine has a free row and its KV budget
allows. Two schedulers over the same rows, chosen per engine:

- **depth** (continuous depth-wise batching, the RRT paper's CDB): an engine step is ONE call of
  the shared block over every active row, each row at its own pass of its own token. A row whose
  token leaves the loop (its exit policy, or the last pass) samples at once and its next token
  starts at pass 0 in the next step's call, so no row waits for another's loops and the block's
  weights are read once for all of them.
- **sequence** (iteration-level batching, the baseline): an engine step takes every active row's
  token through the loop together; a row that exits early idles until the deepest row of the
  step is done; new requests are admitted between steps.

On a backend whose block call pads ragged rows (ONNX Runtime), both schedulers run prompts in a
call of their own rather than pad every decode row to the prompt's length.

Requests without an exit policy or loop cap run the fused graph (every pass in one call, all such
rows batched per step), which is faster when nothing exits. One engine serves the Python API
(`Model.generate` of several prompts) and the HTTP server; it can run in the caller's thread
(`run_until_idle`) or its own (`start` / `stop`). Events (text pieces, the end) reach a request's
callback from the engine's thread.

A step that raises fails the requests in it (finish reason "error"; their rows and KV are freed) and
the engine goes on with the queue: one bad batch does not take the server down. After
`MAX_FAILED_STEPS` failing steps in a row the engine stops for good, fails everything waiting and
refuses new work (`EngineFailed`, HTTP 503), rather than leave requests waiting on a dead thread.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from edgeloop.errors import EdgeloopError
from edgeloop.runtimes.backend import BlockRow, Row
from edgeloop.runtimes.exits import TokenExit
from edgeloop.runtimes.stepping import StepRow, host_step

SCHEDULERS = ("depth", "sequence")
MAX_FAILED_STEPS = 3
log = logging.getLogger("edgeloop.engine")


class QueueFull(EdgeloopError):
    """The engine's queue is at its limit: try again later (HTTP 429)."""


class EngineFailed(EdgeloopError):
    """The engine stopped after repeated failing steps and takes no more work (HTTP 503)."""


@dataclass
class Event:
    kind: str  # "piece" | "done"
    text: str = ""
    token: int = -1
    depth: int = 0


@dataclass(eq=False)
class Job:
    """An admitted or waiting request: the model-level Request plus its place in the engine."""

    request: object  # runtimes.model.Request
    on_event: Callable[[Event], None] | None = None
    id: int = 0
    state: object = None
    tokens: list[int] = field(default_factory=list)  # the token(s) in the loop now (prompt first)
    hidden: np.ndarray | None = None
    passes: int = 0  # passes run for the current token
    exit: TokenExit | None = None
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    submitted: float = 0.0
    emitted: int = 0  # text pieces already sent to on_event

    @property
    def host(self) -> bool:
        return self.request.host

    @property
    def budget(self) -> int:
        return len(self.request.prompt) + self.request.config.max_new_tokens


@dataclass
class Metrics:
    steps: int = 0
    block_calls: int = 0
    rows_per_call: Counter = field(default_factory=Counter)
    idle_row_passes: int = 0  # sequence scheduler: rows waiting in a step for deeper rows
    tokens: int = 0
    exit_depths: Counter = field(default_factory=Counter)
    finished: int = 0
    cancelled: int = 0
    rejected: int = 0
    failed: int = 0  # requests ended by a failing step
    failed_steps: int = 0
    started: float = field(default_factory=time.perf_counter)

    def to_dict(self, queue: int, active: int) -> dict:
        elapsed = time.perf_counter() - self.started
        calls = sum(self.rows_per_call.values())
        return {"queue_depth": queue, "active_rows": active, "steps": self.steps, "block_calls": self.block_calls,
                "mean_rows_per_block_call": round(sum(k * v for k, v in self.rows_per_call.items()) / calls, 3)
                if calls else 0.0, "idle_row_passes": self.idle_row_passes, "generated_tokens": self.tokens,
                "tokens_per_s": round(self.tokens / elapsed, 2) if elapsed else 0.0,
                "exit_depth_histogram": {str(k): v for k, v in sorted(self.exit_depths.items())},
                "finished": self.finished, "cancelled": self.cancelled, "rejected": self.rejected,
                "failed": self.failed, "failed_steps": self.failed_steps}


class Engine:
    def __init__(self, model, *, max_rows: int = 8, max_queue: int = 256, kv_budget: int | None = None,
                 scheduler: str = "depth"):
        if scheduler not in SCHEDULERS:
            raise EdgeloopError(f"unknown scheduler {scheduler!r}; choose depth or sequence")
        if max_rows < 1 or max_queue < 1:
            raise EdgeloopError("max_rows and max_queue must be >= 1")
        self.model, self.backend = model, model.backend
        self.max_rows, self.max_queue, self.scheduler = max_rows, max_queue, scheduler
        self.kv_budget = kv_budget or max_rows * self.backend.max_context
        self.queue: deque[Job] = deque()
        self.active: list[Job] = []
        self.metrics = Metrics()
        self._ids = itertools.count(1)
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None  # why the engine stopped for good
        self.last_error: BaseException | None = None  # the latest failing step's exception
        self.backend.reserve(max_rows)

    # -- requests --------------------------------------------------------------------------------

    def submit(self, request, on_event: Callable[[Event], None] | None = None) -> Job:
        """Queue a request (a runtimes.model.Request); QueueFull when the queue is at its limit."""
        if len(request.prompt) >= self.backend.max_context:
            raise EdgeloopError(f"the prompt has {len(request.prompt)} tokens; the context holds "
                                f"{self.backend.max_context}")
        with self._lock:
            if self.error is not None:
                raise EngineFailed(f"the engine stopped after repeated failures ({self.error}); restart it")
            if len(self.queue) >= self.max_queue:
                self.metrics.rejected += 1
                raise QueueFull(f"the queue holds {len(self.queue)} requests (the limit); try again later")
            job = Job(request, on_event, next(self._ids), submitted=time.perf_counter())
            self.queue.append(job)
            self._lock.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """Stop a request; its row and KV are freed at the next step (or at once if it waits)."""
        with self._lock:
            job.cancelled = True
            if job in self.queue:
                self.queue.remove(job)
                self._finish(job, "cancelled")
            self._lock.notify_all()

    def status(self) -> dict:
        with self._lock:
            return self.metrics.to_dict(len(self.queue), len(self.active))

    # -- running ---------------------------------------------------------------------------------

    def run_until_idle(self) -> None:
        while self.step():
            pass

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="edgeloop-engine", daemon=True)
        self._thread.start()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the engine thread; drain: finish the queued and active requests first."""
        with self._lock:
            self._stopping = True
            if not drain:
                for job in list(self.queue) + list(self.active):
                    job.cancelled = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        failures = 0
        try:
            while True:
                with self._lock:
                    while not self.queue and not self.active and not self._stopping:
                        self._lock.wait()
                    if self._stopping and not self.queue and not self.active:
                        return
                try:
                    self.step()
                    failures = 0
                except Exception as e:  # noqa: BLE001 - the step's requests fail, the others go on
                    failures += 1
                    self._fail_step(e)
                    if failures >= MAX_FAILED_STEPS:
                        raise
        except BaseException as e:  # noqa: BLE001 - reported to every waiting request, not lost
            log.error("engine stopped: %s", e)
            with self._lock:
                self.error = e
                for job in list(self.queue) + list(self.active):
                    self._finish(job, "error")

    def _fail_step(self, e: Exception) -> None:
        """A step raised: end its requests with finish reason "error" (freeing their rows and KV)."""
        log.error("engine step failed, %d request(s) ended: %s", len(self.active), e, exc_info=e)
        self.last_error = e
        self.metrics.failed_steps += 1
        with self._lock:
            for job in list(self.active):
                self._finish(job, "error")

    def step(self) -> bool:
        """One engine step; False when there is nothing left to do."""
        with self._lock:
            self._drop_cancelled()
            self._admit()
            jobs = list(self.active)
        if not jobs:
            return False
        self.metrics.steps += 1
        fused = [j for j in jobs if not j.host]
        host = [j for j in jobs if j.host]
        if fused:
            self._fused_step(fused)
        if host:
            (self._depth_step if self.scheduler == "depth" else self._sequence_step)(host)
        return True

    # -- admission -------------------------------------------------------------------------------

    def _admit(self) -> None:
        used = sum(j.budget for j in self.active)
        while self.queue and len(self.active) < self.max_rows:
            job = self.queue[0]
            if self.active and used + job.budget > self.kv_budget:
                break  # wait for room (an empty engine always takes the next request)
            self.queue.popleft()
            self.backend.prepare(host=job.host)
            job.state = self.backend.new_state(host=job.host)
            job.tokens = list(job.request.prompt)
            job.request.begin(time.perf_counter())
            self.active.append(job)
            used += job.budget

    def _drop_cancelled(self) -> None:
        for job in [j for j in self.active if j.cancelled]:
            self._finish(job, "cancelled")

    def _finish(self, job: Job, reason: str | None = None) -> None:
        if job in self.active:
            self.active.remove(job)
        if job.state is not None:
            self.backend.release(job.state)
            job.state = None
        request = job.request
        if reason in ("cancelled", "error"):
            request.stats.finish_reason = reason
            self.metrics.cancelled += reason == "cancelled"
            self.metrics.failed += reason == "error"
        else:
            request.finish()
            self.metrics.finished += 1
        self._emit_pending(job)
        if job.on_event:
            job.on_event(Event("done"))
        job.done.set()

    def _emit_pending(self, job: Job) -> None:
        pieces = job.request.pieces
        while job.emitted < len(pieces):
            if job.on_event:
                job.on_event(Event("piece", pieces[job.emitted]))
            job.emitted += 1

    def _take(self, job: Job, logits: np.ndarray, depth: int) -> None:
        """A token of `job` is done (its logits at `depth` passes): sample, stream, continue or finish."""
        request = job.request
        token = request.sampler(logits, request.history)
        before = len(request.generated)
        live = request.push(token, depth, job.state, self.backend.max_context)
        if len(request.generated) > before:
            self.metrics.tokens += 1
            self.metrics.exit_depths[depth] += 1
        self._emit_pending(job)
        job.tokens, job.hidden, job.passes, job.exit = [token], None, 0, None
        if not live or job.cancelled:
            with self._lock:
                self._finish(job, "cancelled" if job.cancelled and live else None)
        elif job.host and request.policy is not None and request.policy.exits:
            job.exit = TokenExit(request.policy)

    # -- the three ways to step ------------------------------------------------------------------

    def _fused_step(self, jobs: list[Job]) -> None:
        outs = self.backend.step([Row(j.state, np.asarray(j.tokens, np.int64)) for j in jobs])
        for job, out in zip(jobs, outs):
            self._take(job, out.logits[-1], int(out.depth))

    def _sequence_step(self, jobs: list[Job]) -> None:
        for group in self._groups(jobs):
            rows = [StepRow(j.state, np.asarray(j.tokens, np.int64), exit=j.exit, cap=j.request.config.loops)
                    for j in group]
            results = self._host_step(rows)
            deepest = max(r.depth for r in results)
            for job, res in zip(group, results):
                self.metrics.idle_row_passes += deepest - res.depth
                self._take(job, res.logits[-1], res.depth)

    def _groups(self, jobs: list[Job]) -> list[list[Job]]:
        """One block call per distinct token count on backends that pad ragged rows, so a joining
        prompt does not pad every decode row to its length (prompts run apart, as in prefill-first
        iteration-level servers); one call for all on backends that take ragged rows."""
        if getattr(self.backend, "ragged_block", False):
            return [jobs]
        return [[j for j in jobs if len(j.tokens) == n] for n in sorted({len(j.tokens) for j in jobs})]

    def _host_step(self, rows: list[StepRow]):
        calls = {"n": 0}
        block = self.backend.block

        def counting(items, **kw):
            calls["n"] += 1
            self.metrics.rows_per_call[len(items)] += 1
            return block(items, **kw)

        self.backend.block = counting
        try:
            return host_step(self.backend, rows, strategy=self.model.kv_strategy)
        finally:
            self.backend.block = block
            self.metrics.block_calls += calls["n"]

    def _depth_step(self, jobs: list[Job]) -> None:
        """One block call over every row, each at its own pass; rows that finish a token sample now."""
        loops = self.backend.loops
        start = [j for j in jobs if j.hidden is None]
        if start:
            for job, h in zip(start, self.backend.embed([Row(j.state, np.asarray(j.tokens, np.int64))
                                                           for j in start])):
                job.hidden = h
        for group in self._groups(jobs):
            outs = self.backend.block([BlockRow(j.state, j.hidden, j.passes) for j in group],
                                      complete=self.model.kv_strategy == "fill")
            self.metrics.block_calls += 1
            self.metrics.rows_per_call[len(group)] += 1
            for job, h in zip(group, outs):
                job.hidden, job.passes = h, job.passes + 1
        cap = {id(j): min(loops, j.request.config.loops or loops) for j in jobs}
        probe, forced = [], set()
        for j in jobs:
            if j.passes >= cap[id(j)]:
                forced.add(id(j))
            elif j.exit is not None and not j.exit.needs_logits():
                if j.exit.decide(j.passes, None, None):  # a forced depth: the head only where it leaves
                    forced.add(id(j))
                else:
                    continue
            elif j.exit is None:
                continue
            probe.append(j)
        if not probe:
            return
        heads = self.backend.head([j.hidden[-1:] for j in probe])
        leaving = []
        for job, h in zip(probe, heads):
            done = id(job) in forced
            if not done:
                gate = None if h.exit_score is None else float(h.exit_score[-1])
                done = job.exit.decide(job.passes, h.logits[-1], gate)
            if done:
                leaving.append((job, h.logits[-1]))
        fill = [(j, d) for j, _ in leaving for d in range(j.passes, loops)]
        if fill and self.model.kv_strategy == "fill":
            self.backend.kv_fill([BlockRow(j.state, j.hidden, d) for j, d in fill])
        for job, logits in leaving:
            self.backend.advance(job.state, len(job.tokens))
            self._take(job, logits, job.passes)


def job_result(job: Job):
    """(text, stats) of a finished job."""
    return job.request.text, job.request.stats
