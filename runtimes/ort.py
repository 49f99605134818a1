"""ONNX Runtime driver: the step interface over an edgeloop ONNX artifact, from its contract alone.

The host owns the KV cache (DESIGN.md section 3) in `KVPool`s, one row per live sequence:
- fused states: one buffer pair per KV entry of the contract ([rows, kvh, cap, hd], or stacked
  [rows, R, kvh, cap, hd] for a Loop graph). A batch whose sequences form a contiguous run of
  rows binds views of the buffers; with GroupQueryAttention the graph appends the new K/V in
  place, otherwise it returns them and the driver writes them in.
- host-driven states: per block position k one pool [rows, R, kvh, cap, hd]; the block step
  gathers each row's slot (row * R + depth) and returns the new K/V, written in by the driver.
Tensor names come from the contract's entry points (by role); only numpy and onnxruntime are
imported here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from edgeloop.errors import EdgeloopError
from edgeloop.runtimes.backend import BlockRow, Row, RowOutput
from edgeloop.runtimes.contract import Contract
from edgeloop.runtimes.kvpool import KVPool, Slot


@dataclass(eq=False)
class OrtState:
    host: bool
    slot: Slot | None = None
    length: int = 0


@dataclass
class _Binding:
    """An I/O binding of a run of pool rows, kept across steps: rebinding a dozen buffers per token cost
    ~0.1 ms of Python, a tenth of a decode step on small models (measured)."""

    binding: object
    logits: np.ndarray  # [b, 1, V]: where a decode step's logits land
    extras: dict = field(default_factory=dict)


class OrtBackend:
    name = "onnxruntime"
    ragged_block = False  # one block call can mix rows of different token counts (ORT pads them)

    def __init__(self, path: Path, contract: Contract, *, threads: int | None = None,
                 providers: list[str] | None = None, use_ort_format: bool | None = None, spinning: bool = False):
        import onnxruntime as ort

        self._ort, self.path, self.contract = ort, Path(path), contract
        spec, kv = contract.model, contract.kv
        self.vocab_size, self.hidden_size = spec.vocab_size, spec.hidden_size
        self.max_context = kv.max_context
        self.loops = contract.loop.loops
        self.host_loop = contract.loop.host_loop and "block" in contract.entry_points
        self.dtype = np.dtype(kv.dtype)
        self.kv = kv
        if use_ort_format is None:
            use_ort_format = bool(contract.onnx.ort_models)
        self._ort_format = use_ort_format
        self._threads, self._spinning = threads, spinning
        wanted = providers or [contract.onnx.execution_provider]
        available = ort.get_available_providers()
        missing = [p for p in wanted if p not in available]
        if missing:
            raise EdgeloopError(f"this artifact needs {missing[0]}, which this onnxruntime lacks (available: "
                                f"{', '.join(available)}); install onnxruntime-gpu or compile for --target cpu")
        self._providers = wanted
        self._sessions: dict[str, object] = {}
        self.forward = contract.entry("forward")
        self.session = self._session("forward")  # fail at load, not at the first token
        shapes = {}
        for e in kv.entries:
            mid = ((len(e.depths),) if kv.stacked and len(e.depths) > 1 else ()) + (kv.kv_heads,)
            shapes[f"k.{e.id}"], shapes[f"v.{e.id}"] = mid, mid
        self.pool = KVPool(shapes, head_dim=kv.head_dim, dtype=self.dtype, chunk=kv.capacity_chunk,
                           max_context=kv.max_context)
        self._bindings: dict[tuple, _Binding] = {}
        self._zero_position = np.zeros((1, 1), np.int64)  # logit position of a lone decode token
        self._host_pool: KVPool | None = None

    # -- sessions ------------------------------------------------------------------------------

    def _session(self, entry: str):
        if entry in self._sessions:
            return self._sessions[entry]
        ep = self.contract.entry(entry)
        ort = self._ort
        file = self.contract.onnx.ort_models.get(entry) if self._ort_format else None
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self._spinning else "0")
        if self._threads:
            so.intra_op_num_threads = self._threads
        try:
            session = ort.InferenceSession(str(self.path / (file or ep.symbol)), so, providers=self._providers)
        except Exception as e:  # ORT raises its own exception types for unreadable models
            raise EdgeloopError(f"onnxruntime cannot load {ep.symbol} of {self.path}: "
                                f"{str(e).splitlines()[0][:200]}") from None
        declared_in, declared_out = {t.name for t in ep.inputs}, {t.name for t in ep.outputs}
        got_in, got_out = {i.name for i in session.get_inputs()}, {o.name for o in session.get_outputs()}
        if declared_in != got_in or not declared_out <= got_out:
            raise EdgeloopError(f"{ep.symbol} of {self.path} does not match its contract (inputs "
                                f"{sorted(got_in ^ declared_in)[:3]}); compile the artifact again")
        self._sessions[entry] = session
        return session

    # -- states --------------------------------------------------------------------------------

    def new_state(self, *, host: bool = False) -> OrtState:
        if host and not self.host_loop:
            raise EdgeloopError("this artifact has no host-driven loop entry points (the model has more than one "
                                "looped stage); early exit and depth-wise batching need CYCLE sharing")
        state = OrtState(host)
        state.slot = (self._pool_for_host() if host else self.pool).acquire(state)
        return state

    def reserve(self, streams: int) -> None:
        """Room for `streams` live sequences (rows grow by doubling anyway; this avoids the copies)."""
        if streams > self.pool.rows:
            self.pool._resize(streams, self.pool.capacity)

    def prepare(self, *, host: bool = False) -> None:
        for entry in ("prologue", "block", "block_dense", "epilogue", "kv_fill") if host and self.host_loop else ():
            if entry in self.contract.entry_points:
                self._session(entry)

    def release(self, state: OrtState) -> None:
        if state.slot is not None:
            (self._host_pool if state.host else self.pool).release(state.slot)
            state.slot = None

    def rewind(self, state: OrtState, length: int) -> None:
        state.length = min(state.length, max(0, int(length)))
        self.forget(state, state.length)

    def advance(self, state: OrtState, count: int) -> None:
        state.length += int(count)

    # -- the fused graph -----------------------------------------------------------------------

    def step(self, rows: Sequence[Row]) -> list[RowOutput]:
        out: dict[int, RowOutput] = {}
        for group in self._groups(rows):
            group.sort(key=lambda i: rows[i].state.slot.row)
            start = 0
            for first, count in self.pool.runs([rows[i].state.slot.row for i in group]):
                run = group[start:start + count]
                start += count
                for i, res in zip(run, self._run_forward([rows[i] for i in run], first)):
                    out[i] = res
        return [out[i] for i in range(len(rows))]

    def _groups(self, rows: Sequence[Row]) -> list[list[int]]:
        """Rows that may share a call. GroupQueryAttention takes several rows only as decode tokens or
        as fresh prompts (no past); the two-part attention takes any mix."""
        seen = set()
        for row in rows:
            state = row.state
            if state.host or state.slot is None:
                raise EdgeloopError("step() needs states made by new_state() for the fused graph")
            if id(state) in seen:
                raise EdgeloopError("a batch holds the same sequence twice")
            seen.add(id(state))
            t = len(row.tokens)
            if t == 0:
                raise EdgeloopError("step() needs at least one token per row")
            if state.length + t > self.max_context:
                raise EdgeloopError(f"{state.length + t} tokens exceed the model context of {self.max_context}")
        if not self.kv.inplace:
            return [list(range(len(rows)))]
        decode = [i for i, r in enumerate(rows) if len(r.tokens) == 1]
        fresh = [i for i, r in enumerate(rows) if len(r.tokens) > 1 and r.state.length == 0]
        rest = [[i] for i, r in enumerate(rows) if len(r.tokens) > 1 and r.state.length > 0]
        return [g for g in (decode, fresh) if g] + rest

    def _run_forward(self, rows: list[Row], first: int) -> list[RowOutput]:
        ep, b = self.forward, len(rows)
        lengths = [len(r.tokens) for r in rows]
        t_max = max(lengths)
        self.pool.reserve(max(r.state.length + t for r, t in zip(rows, lengths)))
        if b == 1 and t_max == 1 and not rows[0].all_logits:  # one decode token: the common case, kept lean
            ids = np.asarray(rows[0].tokens, np.int64).reshape(1, 1)
            wanted, n = [None], 1
            positions = self._zero_position
            past = np.array([rows[0].state.length], np.int64)
        else:
            ids = np.zeros((b, t_max), np.int64)
            for i, r in enumerate(rows):
                ids[i, :lengths[i]] = r.tokens
            wanted = [np.arange(t) if r.all_logits else np.array([t - 1]) for r, t in zip(rows, lengths)]
            n = max(len(w) for w in wanted)
            positions = np.stack([np.pad(w, (0, n - len(w)), mode="edge") for w in wanted]).astype(np.int64)
            past = np.array([r.state.length for r in rows], np.int64)
        bound = self._forward_binding(first, b)
        binding = bound.binding
        # Outputs whose shape varies per call are rebound every time (ORT keeps a bound output's shape).
        logits_name = ep.named("logits", output=True)
        if n == 1:
            binding.bind_ortvalue_output(logits_name, bound.extras["logits"])
        else:
            binding.bind_output(logits_name)
        if not self.kv.inplace:
            for e in self.kv.entries:
                for kind in ("key", "value"):
                    binding.bind_output(ep.named(f"present_{kind}", e.id, output=True))
        binding.bind_cpu_input(ep.named("input_ids"), ids)
        binding.bind_cpu_input(ep.named("past_len"), past)
        binding.bind_cpu_input(ep.named("logit_positions"), positions)
        if ep.has("loops"):
            binding.bind_cpu_input(ep.named("loops"), np.array(self.loops, np.int64))
        self.session.run_with_iobinding(binding)
        if n == 1:
            logits = bound.logits
        else:
            logits = binding.get_outputs()[0].numpy()
        if not self.kv.inplace:
            self._write_present(binding, rows, first, lengths)
        results = []
        for i, r in enumerate(rows):
            r.state.length += lengths[i]
            kept = 1 if wanted[i] is None else len(wanted[i])
            results.append(RowOutput(logits[i, :kept].astype(np.float32, copy=True), self.loops))
        return results

    def _forward_binding(self, first: int, count: int) -> _Binding:
        """The binding of rows [first, first + count) with their KV views bound (cached per pool layout)."""
        key = (first, count, self.pool.generation)
        if key in self._bindings:
            return self._bindings[key]
        if len(self._bindings) > 64:
            self._bindings.clear()
        ep, ort = self.forward, self._ort
        binding = self.session.io_binding()
        logits = np.zeros((count, 1, self.vocab_size), self.dtype)
        # logits first: rebinding a name keeps its place, so outputs[0] stays the logits
        logits_value = ort.OrtValue.ortvalue_from_numpy(logits)
        binding.bind_ortvalue_output(ep.named("logits", output=True), logits_value)
        for e in self.kv.entries:
            for kind in ("key", "value"):
                view = self.pool.arrays[f"{kind[0]}.{e.id}"][first:first + count]
                value = ort.OrtValue.ortvalue_from_numpy(view)
                binding.bind_ortvalue_input(ep.named(f"past_{kind}", e.id), value)
                if self.kv.inplace:  # past and present are one buffer
                    binding.bind_ortvalue_output(ep.named(f"present_{kind}", e.id, output=True), value)
                else:
                    binding.bind_output(ep.named(f"present_{kind}", e.id, output=True))
        self._bindings[key] = _Binding(binding, logits, {"logits": logits_value})
        return self._bindings[key]

    def _write_present(self, binding, rows: list[Row], first: int, lengths: list[int]) -> None:
        names = self._output_order()
        values = binding.get_outputs()
        for e in self.kv.entries:
            for kind in ("key", "value"):
                new = values[names[(kind, e.id)]].numpy()  # [b, kvh, T, hd] or [loops, b, kvh, T, hd]
                buf = self.pool.arrays[f"{kind[0]}.{e.id}"]
                stacked = new.ndim == 5
                for i, r in enumerate(rows):
                    p, t = r.state.length, lengths[i]
                    if stacked:
                        buf[first + i, :new.shape[0], :, p:p + t] = new[:, i, :, :t]
                    else:
                        buf[first + i, :, p:p + t] = new[i, :, :t]

    def _output_order(self) -> dict[tuple[str, str], int]:
        """Position of each present output among the binding's outputs (bound in contract order)."""
        if not hasattr(self, "_order"):
            order, i = {}, 1
            for e in self.kv.entries:
                for kind in ("key", "value"):
                    order[(kind, e.id)] = i
                    i += 1
            self._order = order
        return self._order

    # -- the host-driven loop --------------------------------------------------------------------

    def _pool_for_host(self) -> KVPool:
        if self._host_pool is None:
            block = self.contract.entry("block")
            kv, reps = self.kv, self.loops
            positions = sorted({t.kv for t in block.inputs if t.role == "kv_pool_key"})
            shapes = {}
            for k in positions:
                shapes[f"k.{k}"] = shapes[f"v.{k}"] = (reps, kv.kv_heads)
            # valid[row, depth, position]: the token at that position reached that depth (its KV is there)
            self._host_pool = KVPool(shapes, head_dim=kv.head_dim, dtype=self.dtype, chunk=kv.capacity_chunk,
                                     max_context=kv.max_context, masks={"valid": (reps,)})
            self._block_positions = positions
        return self._host_pool

    def embed(self, rows: Sequence[Row]) -> list[np.ndarray]:
        ep = self.contract.entry("prologue")
        lengths = [len(r.tokens) for r in rows]
        ids = np.zeros((len(rows), max(lengths)), np.int64)
        for i, r in enumerate(rows):
            ids[i, :lengths[i]] = r.tokens
        (hidden,) = self._session("prologue").run([ep.named("hidden", output=True)], {ep.named("input_ids"): ids})
        return [hidden[i, :t] for i, t in enumerate(lengths)]

    def block(self, rows: Sequence[BlockRow], *, complete: bool = False) -> list[np.ndarray]:
        b = len(rows)
        lengths = [len(r.hidden) for r in rows]
        starts = [r.state.length if r.position is None else r.position for r in rows]
        # GroupQueryAttention takes several tokens after a past only in a batch of one row: a prompt
        # joining decode rows (sequence-level batching) or a chunk after a past goes to the masked block
        dense = complete and (b == 1 or max(lengths) == 1 or not any(starts))
        entry = "block_dense" if dense and "block_dense" in self.contract.entry_points else "block"
        ep, pool = self.contract.entry(entry), self._pool_for_host()
        for r in rows:
            if not r.state.host or r.state.slot is None:
                raise EdgeloopError("block() needs states made by new_state(host=True)")
            if not 0 <= r.depth < self.loops:
                raise EdgeloopError(f"depth {r.depth} is outside the loop (0 .. {self.loops - 1})")
        pool.reserve(max(s + t for s, t in zip(starts, lengths)))
        hidden = np.zeros((b, max(lengths), self.hidden_size), self.dtype)
        for i, r in enumerate(rows):
            hidden[i, :lengths[i]] = r.hidden
        reps = self.loops
        valid = pool.arrays["valid"]
        mask = valid[[r.state.slot.row for r in rows], [r.depth for r in rows]]  # [b, capacity]
        for i, start in enumerate(starts):
            mask[i, start:] = False  # positions from this call on are the new tokens' own (causal part)
        feeds = {ep.named("hidden"): hidden, ep.named("depth"): np.array([r.depth for r in rows], np.int64),
                 ep.named("past_len"): np.array(starts, np.int64),
                 ep.named("slot"): np.array([r.state.slot.row * reps + r.depth for r in rows], np.int64)}
        if ep.has("kv_valid"):
            feeds[ep.named("kv_valid")] = mask
        for k in self._block_positions:
            for kind in ("key", "value"):
                arr = pool.arrays[f"{kind[0]}.{k}"]
                feeds[ep.named(f"kv_pool_{kind}", k)] = arr.reshape(-1, *arr.shape[2:])  # [rows * R, kvh, cap, hd]
        names = [ep.named("hidden", output=True)] + [ep.named(f"new_{kind}", k, output=True)
                                                      for k in self._block_positions for kind in ("key", "value")]
        outs = self._session(entry).run(names, feeds)
        self._store(rows, starts, lengths, outs[1:])
        return [outs[0][i, :t] for i, t in enumerate(lengths)]

    def _store(self, rows: Sequence[BlockRow], starts: list[int], lengths: list[int], new_kv: list) -> None:
        """Write the new K/V [b, kvh, t, hd] of every block position into the rows' slots, mark them valid."""
        pool = self._host_pool
        for j, k in enumerate(self._block_positions):
            for kind, new in zip(("key", "value"), new_kv[2 * j:2 * j + 2]):
                buf = pool.arrays[f"{kind[0]}.{k}"]
                for i, r in enumerate(rows):
                    buf[r.state.slot.row, r.depth, :, starts[i]:starts[i] + lengths[i]] = new[i, :, :lengths[i]]
        valid = pool.arrays["valid"]
        for i, r in enumerate(rows):
            valid[r.state.slot.row, r.depth, starts[i]:starts[i] + lengths[i]] = True

    def kv_fill(self, rows: Sequence[BlockRow]) -> None:
        """Store at each row's depth the K/V computed from the hidden states it is given (a token's exit
        state copied forward to a depth it skipped)."""
        ep, pool = self.contract.entry("kv_fill"), self._pool_for_host()
        lengths = [len(r.hidden) for r in rows]
        starts = [r.state.length if r.position is None else r.position for r in rows]
        pool.reserve(max(s + t for s, t in zip(starts, lengths)))
        hidden = np.zeros((len(rows), max(lengths), self.hidden_size), self.dtype)
        for i, r in enumerate(rows):
            hidden[i, :lengths[i]] = r.hidden
        feeds = {ep.named("hidden"): hidden, ep.named("depth"): np.array([r.depth for r in rows], np.int64),
                 ep.named("past_len"): np.array(starts, np.int64)}
        names = [ep.named(f"new_{kind}", k, output=True) for k in self._block_positions for kind in ("key", "value")]
        self._store(rows, starts, lengths, self._session("kv_fill").run(names, feeds))

    def forget(self, state: OrtState, start: int) -> None:
        """Positions from `start` on hold nothing at any depth (a rewind, rejected draft tokens)."""
        if state.host and state.slot is not None:
            self._host_pool.arrays["valid"][state.slot.row, :, start:] = False

    def head(self, hidden: Sequence[np.ndarray]) -> list[RowOutput]:
        ep = self.contract.entry("epilogue")
        lengths = [len(h) for h in hidden]
        x = np.zeros((len(hidden), max(lengths), self.hidden_size), self.dtype)
        for i, h in enumerate(hidden):
            x[i, :lengths[i]] = h
        names = [ep.named("logits", output=True)]
        gated = ep.has("exit_score", output=True)
        if gated:
            names.append(ep.named("exit_score", output=True))
        outs = self._session("epilogue").run(names, {ep.named("hidden"): x})
        return [RowOutput(outs[0][i, :t].astype(np.float32), 0, outs[1][i, :t].astype(np.float32) if gated else None)
                for i, t in enumerate(lengths)]

