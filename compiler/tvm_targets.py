"""edgeloop TVM target names -> TVM targets (JSON dicts), library format and lowering pipeline."""

from __future__ import annotations

import platform
from dataclasses import dataclass

import tvm
from tvm import relax

from edgeloop.errors import EdgeloopError


@dataclass(frozen=True)
class TargetPlan:
    name: str
    target: dict  # TVM target as a JSON dict (0.27 no longer parses "llvm -mcpu=..." strings)
    library: str  # file the compiled module is exported to
    cpu: bool  # our CPU schedules and packed tiles apply
    device: str  # the TVM device kind the library runs on
    archs: tuple[str, ...] = ()  # CUDA: the architectures device code is compiled for
    sm_count: int = 0  # GPUs: multiprocessors the decode GEMVs are spread over (tvm_gpu_schedule)


# SMs of the largest part of each architecture (A100, A10/3090, L40/4090, H100/H200): the decode
# GEMVs are split into at least 2 blocks per SM of the largest targeted part.
CUDA_SMS = {"sm_70": 80, "sm_75": 72, "sm_80": 108, "sm_86": 84, "sm_87": 16, "sm_89": 142, "sm_90": 132,
            "sm_100": 148, "sm_120": 170}
DEFAULT_CUDA_ARCHS = ("sm_80", "sm_90")
OTHER_GPU_UNITS = 16  # compute units assumed for OpenCL / Metal / WebGPU targets


def cuda_archs(archs) -> tuple[str, ...]:
    """--arch values (repeatable, comma-separated) -> sorted unique sm_XX names, validated."""
    names = [a.strip() for item in (archs or DEFAULT_CUDA_ARCHS) for a in str(item).split(",") if a.strip()]
    bad = [a for a in names if a not in CUDA_SMS]
    if bad or not names:
        raise EdgeloopError(f"unknown --arch {', '.join(bad) or '(empty)'}; choose from {', '.join(CUDA_SMS)}")
    return tuple(sorted(set(names), key=lambda a: int(a[3:])))


def _host_cpu() -> dict:
    """The build machine's CPU; AVX2 x86 hosts get the portable x86-64-v3 level (AVX2 + FMA)."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        flags = open("/proc/cpuinfo").read() if platform.system() == "Linux" else ""
        return {"kind": "llvm", "mcpu": "x86-64-v3" if " avx2" in flags and " fma" in flags else "x86-64"}
    return {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()}


_ANDROID = {"kind": "llvm", "mtriple": "aarch64-linux-android", "mattr": ["+neon"]}
_IOS = {"kind": "llvm", "mtriple": "arm64-apple-ios", "mattr": ["+neon"]}


def plan(name: str, archs=None) -> TargetPlan:
    """archs: CUDA architectures (default sm_80 and sm_90); the CUDA source is generated for the
    oldest so that it is valid for every one of them."""
    if name == "cpu":
        return TargetPlan(name, _host_cpu(), "model.so", cpu=True, device="cpu")
    if name == "android-cpu":
        return TargetPlan(name, dict(_ANDROID), "model.tar", cpu=True, device="cpu-aarch64-android")
    if name == "ios-cpu":  # the native library's iOS build runs on the CPU (no Metal host code there yet)
        return TargetPlan(name, dict(_IOS), "model.tar", cpu=True, device="cpu-arm64-ios")
    if name == "cuda":
        archs = cuda_archs(archs)
        return TargetPlan(name, {"kind": "cuda", "arch": archs[0], "max_shared_memory_per_block": 49152,
                                 "max_threads_per_block": 1024, "thread_warp_size": 32, "host": {"kind": "llvm"}},
                          "model.tar", False, "cuda", archs=archs, sm_count=max(CUDA_SMS[a] for a in archs))
    gpu = dict(cpu=False, sm_count=OTHER_GPU_UNITS)
    if name == "android-opencl":
        return TargetPlan(name, {"kind": "opencl", "device": "adreno", "host": dict(_ANDROID)}, "model.tar",
                          device="opencl", **gpu)
    if name == "ios-metal":
        return TargetPlan(name, {"kind": "metal", "host": {"kind": "llvm", "mtriple": "arm64-apple-darwin"}},
                          "model.tar", device="metal", **gpu)
    if name == "webgpu":
        return TargetPlan(name, {"kind": "webgpu", "host": {"kind": "llvm", "mtriple": "wasm32-unknown-unknown-wasm"}},
                          "model.tar", device="webgpu", **gpu)
    raise EdgeloopError(f"unknown TVM target {name!r}; choose cpu, cuda, android-cpu, android-opencl, "
                        "ios-cpu, ios-metal or webgpu")


def relax_pipeline(p: TargetPlan, target: tvm.target.Target, on_scheduled=None) -> tvm.transform.Pass:
    """CPU: lowering only (every kernel is already scheduled, FuseOps would re-fuse and unschedule them).
    GPU: the dense kernels carry our schedules (tvm_gpu_schedule); dlight's GPU rules schedule the
    rest (norms, RoPE, embedding, KV cache); MetalMatmul segfaults in 0.27, so Metal skips it.
    on_scheduled(mod): called with the module once every kernel is scheduled (launch checks)."""
    if p.cpu:
        return relax.get_pipeline("default_build")
    from tvm.relax.backend.cuda import pipeline as gpu
    from tvm.s_tir import dlight as dl

    rules = [dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
    if target.kind.name != "metal":
        rules.insert(0, dl.gpu.Matmul())

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod: tvm.ir.IRModule, _ctx) -> tvm.ir.IRModule:
        with target:
            mod = tvm.transform.Sequential([relax.transform.LegalizeOps(), dl.ApplyDefaultSchedule(*rules)])(mod)
            if on_scheduled is not None:
                on_scheduled(mod)
            seq = gpu.dataflow_lower_passes(target) + gpu.finalize_passes(target)
            return tvm.transform.Sequential(seq)(mod)

    return _pipeline
