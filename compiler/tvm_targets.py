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


def _host_cpu() -> dict:
    """The build machine's CPU; AVX2 x86 hosts get the portable x86-64-v3 level (AVX2 + FMA)."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        flags = open("/proc/cpuinfo").read() if platform.system() == "Linux" else ""
        return {"kind": "llvm", "mcpu": "x86-64-v3" if " avx2" in flags and " fma" in flags else "x86-64"}
    return {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()}


_ANDROID = {"kind": "llvm", "mtriple": "aarch64-linux-android", "mattr": ["+neon"]}


def plan(name: str) -> TargetPlan:
    if name == "cpu":
        return TargetPlan(name, _host_cpu(), "model.so", cpu=True, device="cpu")
    if name == "android-cpu":
        return TargetPlan(name, dict(_ANDROID), "model.tar", cpu=True, device="cpu-aarch64-android")
    if name == "cuda":
        return TargetPlan(name, {"kind": "cuda", "arch": "sm_90", "max_shared_memory_per_block": 49152,
                                       "max_threads_per_block": 1024, "thread_warp_size": 32, "host": {"kind": "llvm"}}, "model.tar", False, "cuda")
    if name == "android-opencl":
        return TargetPlan(name, {"kind": "opencl", "device": "adreno", "host": dict(_ANDROID)}, "model.tar", False,
                          "opencl")
    if name == "ios-metal":
        return TargetPlan(name, {"kind": "metal", "host": {"kind": "llvm", "mtriple": "arm64-apple-darwin"}},
                          "model.tar", False, "metal")
    if name == "webgpu":
        return TargetPlan(name, {"kind": "webgpu", "host": {"kind": "llvm", "mtriple": "wasm32-unknown-unknown-wasm"}},
                          "model.tar", False, "webgpu")
    raise EdgeloopError(f"unknown TVM target {name!r}; choose cpu, cuda, android-cpu, android-opencl, ios-metal or webgpu")


def relax_pipeline(p: TargetPlan, target: tvm.target.Target) -> tvm.transform.Pass:
    """CPU: lowering only (every kernel is already scheduled, FuseOps would re-fuse and unschedule them).
    GPU: dlight's GPU rules schedule our TE kernels; MetalMatmul segfaults in 0.27, so Metal skips it."""
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
            seq = [relax.transform.LegalizeOps(), dl.ApplyDefaultSchedule(*rules)]
            seq += gpu.dataflow_lower_passes(target) + gpu.finalize_passes(target)
            return tvm.transform.Sequential(seq)(mod)

    return _pipeline
