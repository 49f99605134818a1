"""ONNX Runtime driver: the step interface over an edgeloop ONNX artifact.

The host owns the KV cache (DESIGN.md section 3): one buffer pair per KV entry of the
manifest, grown in chunks; each step feeds the buffers (masked to past_len inside the graph)
and gets back only the new tokens' K/V, which it writes in at past_len. Only numpy and
onnxruntime are imported here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeloop.errors import EdgeloopError

KV_CHUNK = 256  # capacity grows in steps of this many positions (attention scans the capacity)


@dataclass
class OrtState:
    length: int = 0
    capacity: int = 0
    kv: dict[str, list[np.ndarray]] = field(default_factory=dict)  # entry id -> [keys, values]
    # The I/O binding of this sequence's KV buffers, kept across steps: rebinding a dozen buffers per
    # token cost ~0.1 ms of Python, a tenth of a decode step on small models (measured). Rebuilt when
    # the buffers grow.
    binding: object | None = None
    bound_capacity: int = -1
    logits_row: np.ndarray | None = None  # [1, 1, vocab]: where a decode step's logits land
    logits_value: object | None = None


class OrtBackend:
    name = "onnxruntime"

    def __init__(self, path: Path, manifest: dict, *, threads: int | None = None, providers: list[str] | None = None,
                 use_ort_format: bool | None = None, spinning: bool = False):
        import onnxruntime as ort

        self._ort = ort
        self.path, self.manifest = Path(path), manifest
        io = manifest["io"]
        self.io = io
        self.kv_entries = io["kv"]
        self.dtype = np.dtype(io.get("float_dtype", "float32"))
        model = manifest["model"]
        self.vocab_size = int(model["vocab_size"])
        self.max_context = int(model["max_position"])
        self.default_loops = int(manifest["recursion"]["loops"])
        onnx_info = manifest["onnx"]
        if use_ort_format is None:
            use_ort_format = manifest.get("target") == "mobile"
        file = onnx_info.get("ort_model") if use_ort_format and onnx_info.get("ort_model") else onnx_info["model"]
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        if threads:
            so.intra_op_num_threads = threads
        wanted = providers or [onnx_info.get("execution_provider", "CPUExecutionProvider")]
        available = ort.get_available_providers()
        missing = [p for p in wanted if p not in available]
        if missing:
            raise EdgeloopError(f"this artifact needs {missing[0]}, which this onnxruntime lacks (available: "
                                f"{', '.join(available)}); install onnxruntime-gpu or compile for --target cpu")
        try:
            self.session = ort.InferenceSession(str(self.path / file), so, providers=wanted)
        except Exception as e:  # ORT raises its own exception types for unreadable models
            raise EdgeloopError(f"onnxruntime cannot load {self.path / file}: {str(e).splitlines()[0]}") from None
        self.kv_heads, self.head_dim = io["kv_heads"], io["head_dim"]
        self.inplace = bool(io.get("kv_inplace", False))  # the graph writes into our buffers itself
        self.num_loops: int | None = None  # None: the graph default (all loops)

    # -- state -------------------------------------------------------------------------------

    def new_state(self) -> OrtState:
        state = OrtState()
        state.kv = {e["id"]: [self._buffer(e, 0), self._buffer(e, 0)] for e in self.kv_entries}
        return state

    def _buffer(self, entry: dict, capacity: int) -> np.ndarray:
        lead = (len(entry["depths"]),) if entry["stacked"] else ()
        return np.zeros(lead + (1, self.kv_heads, capacity, self.head_dim), dtype=self.dtype)

    def _reserve(self, state: OrtState, needed: int) -> None:
        if needed <= state.capacity:
            return
        capacity = min(-(-needed // KV_CHUNK) * KV_CHUNK, max(self.max_context, needed))
        for entry in self.kv_entries:
            bufs = state.kv[entry["id"]]
            for i, old in enumerate(bufs):
                new = self._buffer(entry, capacity)
                new[..., : state.length, :] = old[..., : state.length, :]
                bufs[i] = new
        state.capacity = capacity

    def _binding(self, state: OrtState):
        """The sequence's I/O binding with its KV buffers bound (as views: the graph, or our writes after
        each step, update them in place)."""
        if state.binding is not None and state.bound_capacity == state.capacity:
            return state.binding
        binding = self.session.io_binding()
        binding.bind_output("logits")  # first: rebinding a name keeps its place, so outputs[0] stays the logits
        for entry in self.kv_entries:
            for buf, past, present in zip(state.kv[entry["id"]], ("past_key", "past_value"),
                                          ("present_key", "present_value")):
                value = self._ort.OrtValue.ortvalue_from_numpy(buf)
                binding.bind_ortvalue_input(entry[past], value)
                if self.inplace:  # past and present are one buffer
                    binding.bind_ortvalue_output(entry[present], value)
        if state.logits_value is None:
            state.logits_row = np.zeros((1, 1, self.vocab_size), dtype=self.dtype)
            state.logits_value = self._ort.OrtValue.ortvalue_from_numpy(state.logits_row)
        state.binding, state.bound_capacity = binding, state.capacity
        return binding

    def rewind(self, state: OrtState, length: int) -> None:
        state.length = min(state.length, max(0, length))

    # -- the step ------------------------------------------------------------------------------

    def step(self, state: OrtState, tokens: np.ndarray, *, all_logits: bool = False) -> np.ndarray:
        tokens = np.ascontiguousarray(np.asarray(tokens, dtype=np.int64).reshape(1, -1))
        t = tokens.shape[1]
        if state.length + t > self.max_context:
            raise EdgeloopError(f"{state.length + t} tokens exceed the model context of {self.max_context}")
        self._reserve(state, state.length + t)  # room for the new tokens first (in place: the graph writes them)
        binding = self._binding(state)
        binding.bind_cpu_input("input_ids", tokens)
        binding.bind_cpu_input("past_len", np.array(state.length, dtype=np.int64))
        binding.bind_cpu_input("num_logits", np.array(t if all_logits else 1, dtype=np.int64))
        loops = self.default_loops if self.num_loops is None else self.num_loops
        binding.bind_cpu_input("num_loops", np.array(loops, dtype=np.int64))
        # One row of logits (every decode step) lands in a buffer of ours; other outputs are left to
        # ORT and rebound every step (once allocated, a bound output is reused, and their shapes vary).
        one_row = t == 1 or not all_logits
        if one_row:
            binding.bind_ortvalue_output("logits", state.logits_value)
        else:
            binding.bind_output("logits")
        if not self.inplace:
            for entry in self.kv_entries:
                binding.bind_output(entry["present_key"])
                binding.bind_output(entry["present_value"])
        self.session.run_with_iobinding(binding)
        if self.inplace:  # no get_outputs(): wrapping every bound KV buffer costs more than the copy below
            logits = state.logits_row[0].copy() if one_row else binding.get_outputs()[0].numpy()[0]
            state.length += t
            return logits.astype(np.float32, copy=False)
        outputs = binding.get_outputs()
        logits = state.logits_row[0].copy() if one_row else outputs[0].numpy()[0]
        # Write the new tokens' K/V into the host buffers.
        for i, entry in enumerate(self.kv_entries):
            keys, values = state.kv[entry["id"]]
            new_k, new_v = outputs[1 + 2 * i].numpy(), outputs[2 + 2 * i].numpy()
            loops = new_k.shape[0] if entry["stacked"] else None
            if loops is not None:
                keys[:loops, ..., state.length:state.length + t, :] = new_k
                values[:loops, ..., state.length:state.length + t, :] = new_v
            else:
                keys[..., state.length:state.length + t, :] = new_k
                values[..., state.length:state.length + t, :] = new_v
        state.length += t
        return logits.astype(np.float32, copy=False)
