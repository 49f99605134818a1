"""TVM driver: the step interface over an artifact compiled by `edgeloop.compiler.tvm_build`.

Needs only the TVM runtime and numpy; function names and argument roles come from the contract.
Sequences live in TVM's paged KV cache. A cache object (a `_Group`) holds several sequences, so
a batch of rows in one group is one call: their tokens are concatenated (ragged), bracketed by
begin_forward / end_forward with each row's sequence id and length. Host-driven states use the
step cache (K layers), where each (stream, depth) pair is a sequence of its own: one block call
mixes rows at different depths, and a row that skipped a depth simply has no entry there.
A `--target cuda` artifact also needs a CUDA GPU and TVM's CUDA runtime; its device code ships
compiled (see `compiler/tvm_cuda.py`), so no compiler is needed to load it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from edgeloop.errors import EdgeloopError
from edgeloop.runtimes.backend import BlockRow, Row, RowOutput
from edgeloop.runtimes.contract import Contract


class _Group:
    """One paged KV cache object with room for `capacity` streams (each one sequence, or B for the
    host-driven step cache)."""

    def __init__(self, backend: TvmBackend, host: bool, capacity: int):
        tvm = backend._tvm
        self.host, self.capacity = host, capacity
        self.per_stream = backend.loops if host else 1
        sequences = capacity * self.per_stream
        create = backend.vm[backend.contract.entry("create_step_kv_cache" if host else "create_kv_cache").symbol]
        self.kv = create(tvm.runtime.ShapeTuple([sequences, sequences * backend.max_context, backend._chunk,
                                                 backend._page, 0]))
        self.free = list(range(capacity))
        self.live = 0

    def seq(self, slot: int, depth: int = 0) -> int:
        return slot * self.per_stream + depth


@dataclass(eq=False)
class TvmState:
    host: bool
    group: _Group | None = None
    slot: int = -1
    length: int = 0
    # host-driven: the positions stored in each depth's sequence (a skipped depth has no entry)
    written: list[list[int]] = field(default_factory=list)


class TvmBackend:
    name = "tvm"
    ragged_block = True  # one block call can mix rows of different token counts

    def __init__(self, path: Path, contract: Contract, *, threads: int | None = None, max_batch: int | None = None,
                 **_options):
        import tvm
        from tvm.runtime.vm import VirtualMachine

        section = contract.tvm
        path = Path(path)
        if section.device == "cuda":
            device = cuda_device(tvm, section.cuda)
            devices = [device, tvm.cpu()]  # kernels on the GPU, the VM's shape code on the host
        elif section.device == "cpu":
            device = tvm.cpu()
            devices = [device]
        else:
            raise EdgeloopError(f"this artifact was compiled for --target {contract.target} ({section.device}) and runs "
                                "on that device's TVM runtime; compile with --target cpu to run it here")
        if threads:
            tvm.get_global_func("runtime.config_threadpool")(1, int(threads))
        self._tvm, self.contract, self.path = tvm, contract, path
        try:
            self.vm = VirtualMachine(tvm.runtime.load_module(str(path / section.library)), devices)
            stored = tvm.runtime.load_param_dict_from_file(str(path / section.params))
        except Exception as e:  # noqa: BLE001 - TVM raises its own error types for damaged files
            raise EdgeloopError(f"TVM cannot load {path}: {str(e).strip().splitlines()[-1][:200]}; the artifact is "
                                "damaged, compile it again") from None
        missing = [n for n in section.param_names if n not in stored]
        if missing:
            raise EdgeloopError(f"{path / section.params} lacks {missing[0]}; the artifact is corrupt, compile it again")
        on_gpu = len(devices) > 1
        self.params = [stored[n].copyto(device) if on_gpu else stored[n] for n in section.param_names]
        self._device = device
        kv = contract.kv
        self.vocab_size, self.hidden_size = contract.model.vocab_size, contract.model.hidden_size
        self.max_context = kv.max_context
        self.loops = contract.loop.loops
        self.host_loop = contract.loop.host_loop and "block" in contract.entry_points
        self._chunk, self._page = kv.prefill_chunk, kv.page_size
        self._token_dtype = np.dtype(section.token_dtype)
        self._float = np.dtype(kv.dtype)
        self._fn = {name: self._function(name) for name in contract.entry_points if not name.startswith("create")}
        builtin = tvm.get_global_func
        self._add_sequence = builtin("vm.builtin.kv_state_add_sequence")
        self._remove_sequence = builtin("vm.builtin.kv_state_remove_sequence")
        self._begin = builtin("vm.builtin.kv_state_begin_forward")
        self._end = builtin("vm.builtin.kv_state_end_forward")
        self._popn = builtin("vm.builtin.kv_state_popn")
        self._groups: dict[bool, list[_Group]] = {False: [], True: []}
        self._reserved = max(1, int(max_batch or 1))

    def _function(self, name: str):
        symbol = self.contract.entry(name).symbol
        try:
            return self.vm[symbol]
        except Exception:  # noqa: BLE001
            raise EdgeloopError(f"the library of {self.path} has no function {symbol!r} its contract promises; "
                                "compile the artifact again") from None

    def _call(self, name: str, *args):
        try:
            return self._fn[name](*args)
        except Exception as e:  # noqa: BLE001 - a damaged library or params fail inside TVM
            raise EdgeloopError(f"TVM failed running {name} of {self.path}: "
                                f"{(str(e).strip().splitlines() or ['error'])[-1][:200]}") from None

    def _tensor(self, array: np.ndarray):
        return self._tvm.runtime.tensor(array, self._device)

    # -- states --------------------------------------------------------------------------------

    def reserve(self, streams: int) -> None:
        """Room for `streams` sequences in one cache, so they can step together (the engine calls it
        before creating a batch's states)."""
        self._reserved = max(self._reserved, int(streams))

    def new_state(self, *, host: bool = False) -> TvmState:
        if host and not self.host_loop:
            raise EdgeloopError("this artifact has no host-driven loop functions (the model has more than one "
                                "looped stage); early exit and depth-wise batching need CYCLE sharing")
        groups = self._groups[host]
        group = next((g for g in groups if g.free), None)
        if group is None:
            if groups and not any(g.live for g in groups):
                groups.clear()  # idle caches: replace them with one big enough
            group = _Group(self, host, max(self._reserved, 2 * max((g.capacity for g in groups), default=0)))
            groups.append(group)
        state = TvmState(host, group, group.free.pop(0))
        group.live += 1
        for depth in range(group.per_stream):
            self._add_sequence(group.kv, group.seq(state.slot, depth))
        if host:
            state.written = [[] for _ in range(group.per_stream)]
        return state

    def prepare(self, *, host: bool = False) -> None:
        """Nothing to load lazily: every function is ready after load."""

    def release(self, state: TvmState) -> None:
        group = state.group
        if group is None:
            return
        for depth in range(group.per_stream):
            self._remove_sequence(group.kv, group.seq(state.slot, depth))
        group.free.append(state.slot)
        group.live -= 1
        state.group = None

    def rewind(self, state: TvmState, length: int) -> None:
        length = max(0, int(length))
        if state.group is None or length >= state.length:
            return
        if state.host:
            self.forget(state, length)
        else:
            self._popn(state.group.kv, state.group.seq(state.slot), state.length - length)
        state.length = length

    def advance(self, state: TvmState, count: int) -> None:
        state.length += int(count)

    # -- fused functions -----------------------------------------------------------------------

    def step(self, rows: Sequence[Row]) -> list[RowOutput]:
        results: list[list[np.ndarray]] = [[] for _ in rows]
        pending = []  # (row index, tokens not yet fed)
        for i, row in enumerate(rows):
            state = row.state
            if state.host or state.group is None:
                raise EdgeloopError("step() needs states made by new_state() for the fused functions")
            tokens = np.asarray(row.tokens, np.int64).reshape(-1)
            if tokens.size == 0:
                raise EdgeloopError("step() needs at least one token per row")
            if state.length + tokens.size > self.max_context:
                raise EdgeloopError(f"{state.length + tokens.size} tokens exceed the artifact's context of "
                                    f"{self.max_context}; rewind the state or start a new one")
            pending.append((i, tokens))
        while pending:  # rounds of at most one prefill chunk per row
            by_group: dict[int, list[tuple[int, np.ndarray]]] = {}
            for i, tokens in pending:
                by_group.setdefault(id(rows[i].state.group), []).append((i, tokens[:self._chunk]))
            for calls in by_group.values():
                for batch in self._fit_chunk(calls):
                    for (i, _), logits in zip(batch, self._forward([rows[i] for i, _ in batch],
                                                                   [t for _, t in batch])):
                        results[i].append(logits)
            pending = [(i, t[self._chunk:]) for i, t in pending if t.size > self._chunk]
        return [RowOutput(np.concatenate(parts) if row.all_logits else parts[-1][-1:], self.loops)
                for row, parts in zip(rows, results)]

    def _fit_chunk(self, calls):
        """Split a group's rows into calls of at most one prefill chunk of tokens."""
        batch, tokens = [], 0
        for call in calls:
            if batch and tokens + call[1].size > self._chunk:
                yield batch
                batch, tokens = [], 0
            batch.append(call)
            tokens += call[1].size
        if batch:
            yield batch

    def _forward(self, rows: list[Row], tokens: list[np.ndarray]) -> list[np.ndarray]:
        tvm = self._tvm
        group = rows[0].state.group
        lengths = [t.size for t in tokens]
        ids = np.concatenate(tokens).astype(self._token_dtype)
        self._begin(group.kv, tvm.runtime.ShapeTuple([group.seq(r.state.slot) for r in rows]),
                    tvm.runtime.ShapeTuple(lengths))
        try:
            if len(rows) == 1 and lengths[0] == 1:
                logits = self._call("decode", self._tensor(ids), group.kv, self.params).numpy()
                per_row = [logits]
            else:
                ends = np.cumsum(lengths)
                picks = [np.arange(e - n, e) if r.all_logits else np.array([e - 1])
                         for r, n, e in zip(rows, lengths, ends)]
                pos = np.concatenate(picks).astype(np.int32)
                logits = self._call("forward", self._tensor(ids), group.kv, self._tensor(pos), self.params).numpy()
                per_row = np.split(logits, np.cumsum([len(p) for p in picks])[:-1])
        finally:
            self._end(group.kv)
        for r, n in zip(rows, lengths):
            r.state.length += n
        return [p.astype(np.float32, copy=False) for p in per_row]

    # -- the host-driven loop --------------------------------------------------------------------

    def embed(self, rows: Sequence[Row]) -> list[np.ndarray]:
        lengths = [len(r.tokens) for r in rows]
        ids = np.concatenate([np.asarray(r.tokens, np.int64) for r in rows]).astype(self._token_dtype)
        hidden = self._call("prologue", self._tensor(ids), self.params).numpy()
        return np.split(hidden, np.cumsum(lengths)[:-1])

    def block(self, rows: Sequence[BlockRow], *, complete: bool = False) -> list[np.ndarray]:
        return self._host_call("block", rows)  # the written-position lists are exact either way

    def kv_fill(self, rows: Sequence[BlockRow]) -> None:
        """Append at each row's depth the K/V computed from the hidden states it is given (a token's exit
        state copied forward to a depth it skipped)."""
        self._host_call("kv_fill", rows)

    def forget(self, state: TvmState, start: int) -> None:
        """Positions from `start` on hold nothing at any depth (rejected draft tokens)."""
        if state.host and state.group is not None:
            for depth, positions in enumerate(state.written):
                drop = sum(1 for p in positions if p >= start)
                if drop:
                    self._popn(state.group.kv, state.group.seq(state.slot, depth), drop)
                    del positions[len(positions) - drop:]

    def _host_call(self, entry: str, rows: Sequence[BlockRow]) -> list[np.ndarray]:
        tvm = self._tvm
        out: list[np.ndarray | None] = [None] * len(rows)
        by_group: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            if not r.state.host or r.state.group is None:
                raise EdgeloopError("block() needs states made by new_state(host=True)")
            if not 0 <= r.depth < self.loops:
                raise EdgeloopError(f"depth {r.depth} is outside the loop (0 .. {self.loops - 1})")
            by_group.setdefault(id(r.state.group), []).append(i)
        for members in by_group.values():
            group = rows[members[0]].state.group
            work = []  # (row index, sequence id, start position, hidden [t, H])
            for i in members:
                r = rows[i]
                start = r.state.length if r.position is None else r.position
                written = r.state.written[r.depth]
                stale = sum(1 for p in written if p >= start)  # rewriting positions (a draft verified again)
                if stale:
                    self._popn(group.kv, group.seq(r.state.slot, r.depth), stale)
                    del written[len(written) - stale:]
                t = len(r.hidden)
                if start + t > self.max_context:
                    raise EdgeloopError(f"{start + t} tokens exceed the artifact's context of {self.max_context}")
                written.extend(range(start, start + t))
                work.append((i, group.seq(r.state.slot, r.depth), start, np.asarray(r.hidden, self._float)))
            # one call when the tokens fit the cache's prefill chunk; else each row alone, chunk by chunk
            # (a chunk attends to the row's earlier chunks, already in the cache)
            if sum(len(h) for *_, h in work) <= self._chunk:
                calls = [work]
            else:
                calls = [[(i, seq, start + o, h[o:o + self._chunk])] for i, seq, start, h in work
                         for o in range(0, len(h), self._chunk)]
            parts: dict[int, list[np.ndarray]] = {}
            for call in calls:
                lengths = [len(h) for *_, h in call]
                depth = [rows[i].depth for i, *_, h in call for _ in range(len(h))]
                pos = [p for _, _, start, h in call for p in range(start, start + len(h))]
                self._begin(group.kv, tvm.runtime.ShapeTuple([seq for _, seq, _, _ in call]),
                            tvm.runtime.ShapeTuple(lengths))
                try:
                    y = self._call(entry, self._tensor(np.concatenate([h for *_, h in call])), group.kv,
                                   self._tensor(np.asarray(depth, np.int32)), self._tensor(np.asarray(pos, np.int32)),
                                   self.params)
                finally:
                    self._end(group.kv)
                if entry == "block":
                    for (i, *_), part in zip(call, np.split(y.numpy(), np.cumsum(lengths)[:-1])):
                        parts.setdefault(i, []).append(part)
            for i, chunks in parts.items():
                out[i] = np.concatenate(chunks)
        return out

    def head(self, hidden: Sequence[np.ndarray]) -> list[RowOutput]:
        lengths = [len(h) for h in hidden]
        x = np.concatenate([np.asarray(h, self._float) for h in hidden])
        res = self._call("epilogue", self._tensor(x), self.params)
        gated = self.contract.entry("epilogue").has("exit_score", output=True)
        logits = (res[0] if gated else res).numpy()
        score = res[1].numpy()[:, 0] if gated else None
        cuts = np.cumsum(lengths)[:-1]
        scores = np.split(score, cuts) if gated else [None] * len(lengths)
        return [RowOutput(lg.astype(np.float32), 0, sc) for lg, sc in zip(np.split(logits, cuts), scores)]


def cuda_device(tvm, cuda):
    """The CUDA device a `--target cuda` artifact runs on, or a one-line error. Device code shipped as
    a fatbin loads as is; CUDA source (compiled where nvcc was missing) is compiled here with NVRTC."""
    import ctypes

    if tvm.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is None:
        # TVM imported without its CUDA runtime (runtime-only installs): load it next to libtvm_runtime
        lib = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
        try:
            ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
        except OSError:
            pass
    archs = ", ".join(cuda.archs if cuda else ()) or "CUDA"
    try:
        device = tvm.cuda(0)
        present = bool(device.exist)
    except Exception:  # noqa: BLE001 - no CUDA runtime library or driver at all
        present = False
    if not present:
        raise EdgeloopError(f"this artifact runs on an NVIDIA GPU ({archs}) and no CUDA device was found here; "
                            "compile with --target cpu to run it on this machine")
    if cuda is not None and cuda.device_code == "source":
        _register_nvrtc(tvm, "sm_" + device.compute_version.replace(".", ""))
    return device


def _register_nvrtc(tvm, arch: str) -> None:
    """Compile shipped CUDA source for this GPU at load time (TVM's own callback needs its compiler)."""
    import tvm_ffi

    def compile_source(code, *_target):
        from tvm.support import nvcc

        try:
            return nvcc.compile_cuda(code, target_format="cubin", arch=arch, compiler="nvrtc")
        except Exception as e:  # noqa: BLE001 - say what is missing, in one line
            raise EdgeloopError(f"this artifact ships CUDA source (nvcc was missing when it was compiled) and NVRTC "
                                f"could not compile it here ({e}); install cuda-bindings, or recompile the artifact "
                                "where nvcc is installed") from e

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_source, override=True)
