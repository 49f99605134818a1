"""TVM backend driver: runs an artifact compiled by `edgeloop.compiler.tvm_build`.

Needs only the TVM runtime and numpy (a `--target cuda` artifact: also a CUDA GPU and TVM's CUDA
runtime; its device code ships compiled, see `compiler/tvm_cuda.py`). The library exports four
Relax functions (names in the manifest's io.entry): `create_kv_cache`, `prefill` (logits of the last position), `prefill_all`
(logits of every position) and `decode` (one token). The KV cache is TVM's paged cache with one
layer per depth position; this driver owns one sequence (id 0) per state and brackets every
call with begin_forward / end_forward, splitting long prompts into prefill chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeloop.errors import EdgeloopError

SEQ_ID = 0


@dataclass
class TvmState:
    kv: object  # the paged KV cache (a TVM runtime object)
    length: int = 0


class TvmBackend:
    name = "tvm"

    def __init__(self, path: Path, manifest: dict, *, threads: int | None = None, **_options):
        import tvm
        from tvm.runtime.vm import VirtualMachine

        io = manifest.get("io", {})
        if io.get("target", {}).get("kind") == "cuda":
            self.device = cuda_device(tvm, manifest)
            devices = [self.device, tvm.cpu()]  # kernels on the GPU, the VM's shape code on the host
        elif not io.get("runs_on_host"):
            raise EdgeloopError(f"this artifact was compiled for --target {manifest.get('target')} and runs on that "
                                "device's TVM runtime; compile with --target cpu to run it here")
        else:
            self.device = tvm.cpu()
            devices = [self.device]
        if threads:
            tvm.get_global_func("runtime.config_threadpool")(1, int(threads))
        path = Path(path)
        self._tvm = tvm
        self.vm = VirtualMachine(tvm.runtime.load_module(str(path / io["library"])), devices)
        stored = tvm.runtime.load_param_dict_from_file(str(path / io["params"]))
        missing = [n for n in io["param_names"] if n not in stored]
        if missing:
            raise EdgeloopError(f"{path / io['params']} lacks {missing[0]}; the artifact is corrupt, compile it again")
        on_gpu = len(devices) > 1
        self.params = [stored[n].copyto(self.device) if on_gpu else stored[n] for n in io["param_names"]]
        kv = io["kv_cache"]
        self.vocab_size = int(manifest["model"]["vocab_size"])
        self.max_context = int(kv["max_context"])
        self._chunk, self._page = int(kv["prefill_chunk"]), int(kv["page_size"])
        entry = io["entry"]
        self._create, self._prefill = self.vm[entry["create_kv_cache"]], self.vm[entry["prefill"]]
        self._prefill_all, self._decode = self.vm[entry["prefill_all"]], self.vm[entry["decode"]]
        builtin = tvm.get_global_func
        self._add_sequence = builtin("vm.builtin.kv_state_add_sequence")
        self._begin = builtin("vm.builtin.kv_state_begin_forward")
        self._end = builtin("vm.builtin.kv_state_end_forward")
        self._popn = builtin("vm.builtin.kv_state_popn")
        self._seq = tvm.runtime.ShapeTuple([SEQ_ID])

    def new_state(self) -> TvmState:
        shape = self._tvm.runtime.ShapeTuple([1, self.max_context, self._chunk, self._page, 0])
        kv = self._create(shape)
        self._add_sequence(kv, SEQ_ID)
        return TvmState(kv)

    def step(self, state: TvmState, tokens: np.ndarray, *, all_logits: bool = False) -> np.ndarray:
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise EdgeloopError("step() needs at least one token")
        if state.length + ids.size > self.max_context:
            raise EdgeloopError(f"{state.length + ids.size} tokens exceed the artifact's context of "
                                f"{self.max_context}; rewind the state or start a new one")
        outs = []
        for start in range(0, ids.size, self._chunk):
            chunk = ids[start:start + self._chunk]
            last = start + self._chunk >= ids.size
            outs.append(self._forward(state, chunk, all_logits or not last))
        logits = np.concatenate(outs) if all_logits else outs[-1][-1:]
        return logits.astype(np.float32, copy=False)

    def _forward(self, state: TvmState, ids: np.ndarray, all_logits: bool) -> np.ndarray:
        if all_logits:
            fn = self._prefill_all
        else:
            fn = self._decode if ids.size == 1 else self._prefill
        self._begin(state.kv, self._seq, self._tvm.runtime.ShapeTuple([int(ids.size)]))
        logits = fn(self._tvm.runtime.tensor(ids.astype(np.int32), device=self.device), state.kv, self.params)
        self._end(state.kv)
        state.length += int(ids.size)
        return logits.numpy()

    def rewind(self, state: TvmState, length: int) -> None:
        if 0 <= length < state.length:
            self._popn(state.kv, SEQ_ID, state.length - length)
            state.length = length


def cuda_device(tvm, manifest: dict):
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
    cuda = manifest.get("cuda", {})
    archs = ", ".join(cuda.get("archs", [])) or "CUDA"
    try:
        device = tvm.cuda(0)
        present = bool(device.exist)
    except Exception:  # noqa: BLE001 - no CUDA runtime library or driver at all
        present = False
    if not present:
        raise EdgeloopError(f"this artifact runs on an NVIDIA GPU ({archs}) and no CUDA device was found here; "
                            "compile with --target cpu to run it on this machine")
    if cuda.get("device_code") == "source":
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
