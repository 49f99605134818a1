"""`build` for backend "tvm": a recursive model -> a compiled Relax VM library + its parameters.

Pipeline (each step a small function, in order):
    check_options -> plan target -> lay out params (numpy) -> emit Relax (tvm_graph)
    -> compile (our CPU schedules, or dlight on GPUs) -> export library + params -> manifest section
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path


from edgeloop.compiler.artifact import BackendResult, loop_state
from edgeloop.compiler.loading import CompileInput
from edgeloop.compiler.options import CompileOptions
from edgeloop.errors import EdgeloopError
from edgeloop.runtimes.contract import CudaCode, KVLayout, TvmSection

PARAMS_FILE = "params.bin"
PAGE_SIZE = 16
PREFERRED_TILE = 16  # output columns per register tile: two AVX2 vectors / four NEON vectors


def check_options(options: CompileOptions) -> None:
    if options.layout != "loop":
        raise EdgeloopError("the tvm backend always emits the recursion layout; drop --layout unrolled")
    if options.quant not in ("none", "int4"):
        raise EdgeloopError(f"--quant {options.quant} is not supported by the tvm backend; use --quant int4 or none, "
                            "or --backend onnxruntime")
    if options.quant == "int4" and options.quantize_embeddings:
        raise EdgeloopError("the tvm backend keeps the embedding and LM head float; drop --quantize-embeddings")
    if options.lora_dtype != "float32":
        raise EdgeloopError("the tvm backend stores LoRA in float32; drop --lora-dtype")
    if options.tune_trials:
        raise EdgeloopError("the tvm backend ships tuning-free schedules; drop --tune-trials")


def int4_config(options: CompileOptions):
    """The int4 packing options (quant_pack's, as the ORT backend uses them), or None for fp32."""
    from edgeloop.compiler.tvm_params import Int4Config

    if options.quant != "int4":
        return None
    return Int4Config(block_size=options.block_size, symmetric=options.symmetric, search=options.scale_search,
                      keep_float=tuple(options.keep_float))


def max_context(model: CompileInput) -> int:
    """Positions the artifact holds. Within a sliding window attention is plain causal attention,
    so capping the context at the window keeps the model exact without a windowed kernel."""
    spec = model.spec
    return min(spec.max_position, spec.sliding_window or spec.max_position)


def write_device_sources(executable, out_dir: Path) -> list[str]:
    """Save the generated CUDA source next to the library (as model.cu), so it can be checked
    with nvcc and read, even on machines without a GPU or driver."""
    written = []
    seen, stack = set(), [executable.mod]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        stack.extend(module.imports)
        if module.kind == "cuda":
            source = module.inspect_source()
            name = "model.cu" if not written else f"model{len(written)}.cu"
            (out_dir / name).write_text(source)
            written.append(name)
    return written


@contextlib.contextmanager
def cuda_source_module(p):
    """CUDA: keep the kernels as source in the built module even where a CUDA driver is installed
    (TVM would otherwise compile them at once, for this machine's GPU only); `export` compiles them
    for every --arch."""
    if p.target.get("kind") != "cuda":
        yield
        return
    old = os.environ.get("TVM_COMPILE_FORCE_FALLBACK")
    os.environ["TVM_COMPILE_FORCE_FALLBACK"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TVM_COMPILE_FORCE_FALLBACK", None)
        else:
            os.environ["TVM_COMPILE_FORCE_FALLBACK"] = old


def export(executable, path: Path, p) -> dict | None:
    """Write the library; CUDA: with a fatbin when nvcc is here (tvm_cuda), else with the CUDA source,
    which the runtime compiles with NVRTC at load time. Returns the manifest's "cuda" section."""
    if p.target.get("kind") != "cuda":
        executable.export_library(str(path))
        return None
    from edgeloop.compiler import tvm_cuda

    nvcc = tvm_cuda.find_nvcc()
    if nvcc is None:
        executable.export_library(str(path))
        return {"archs": list(p.archs), "device_code": "source",
                "note": "nvcc was not found at compile time: the CUDA source ships and is compiled with NVRTC "
                        "when the artifact is loaded"}
    entries = tvm_cuda.export_with_fatbin(executable, path, p.archs, nvcc)
    return {"archs": sorted({e["arch"] for e in entries if e["kind"] == "elf"}, key=lambda a: int(a[3:])),
            "ptx": sorted({e["arch"].replace("sm_", "compute_") for e in entries if e["kind"] == "ptx"}),
            "device_code": "fatbin", "fatbin_entries": entries}


def build(model: CompileInput, options: CompileOptions, out_dir: Path) -> BackendResult:
    import tvm

    from edgeloop.compiler.tvm_gpu_check import launch_table
    from edgeloop.compiler.tvm_graph import GraphBuilder
    from edgeloop.compiler.tvm_params import build_params, int4_summary, tile_width
    from edgeloop.compiler.tvm_targets import plan, relax_pipeline

    check_options(options)
    p = plan(options.target, options.arch)
    target = tvm.target.Target(p.target)
    context = max_context(model)
    tile = tile_width(model.spec, model.recursion, PREFERRED_TILE) if p.cpu else 1
    int4 = int4_config(options)
    params = build_params(model.spec, model.recursion, model.tensors, tile, context, int4, options.dtype)

    start = time.perf_counter()
    graph = GraphBuilder(model.spec, model.recursion, params, tile=tile, target=target, cpu_schedules=p.cpu,
                         sm_count=p.sm_count)
    mod = graph.build()
    if p.cpu:  # the cache's scalar prefill attention -> our vectorized one (tvm_attention)
        from edgeloop.compiler.tvm_attention import install

        s = model.spec
        mod = install(mod, h_kv=s.num_kv_heads, h_q=s.num_heads, d=s.head_dim)
    instruments = []
    if options.debug_dump:
        dump = Path(options.debug_dump)
        dump.mkdir(parents=True, exist_ok=True)
        (dump / "000-built.py").write_text(mod.script())
        instruments.append(tvm.instrument.DumpIR(dump))  # the module after every pass, one file each
    launches: dict = {}
    try:
        with cuda_source_module(p), tvm.transform.PassContext(opt_level=3, instruments=instruments):
            executable = tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(
                p, target, lambda m: launches.update(launch_table(m))))
    except Exception as e:  # noqa: BLE001 - surface TVM's failure as one actionable line
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
        raise EdgeloopError(f"TVM could not compile for --target {options.target}: {reason}; "
                            "try --target cpu or report the model config") from e
    compile_s = time.perf_counter() - start
    cuda = export(executable, out_dir / p.library, p)
    device_sources = write_device_sources(executable, out_dir)
    tvm.runtime.save_param_dict_to_file({n: tvm.runtime.tensor(a) for n, a in zip(params.names, params.arrays)},
                                        str(out_dir / PARAMS_FILE))

    chunk = min(context, 1024)
    return BackendResult(
        layout="recursion",
        loop=loop_state(model),
        kv=KVLayout(kind="paged", dtype=options.dtype, kv_heads=model.spec.num_kv_heads, head_dim=model.spec.head_dim,
                    num_depths=model.recursion.num_depths, max_context=context, page_size=PAGE_SIZE,
                    prefill_chunk=chunk),
        entry_points=entry_points(model, graph.host_loop),
        tvm=TvmSection(library=p.library, params=PARAMS_FILE, param_names=tuple(params.names), device=p.device,
                       target=p.target, token_dtype="int32", device_sources=tuple(device_sources),
                       cuda=CudaCode(**cuda) if cuda else None),
        quantization=int4_summary(params, int4) if int4 else None,
        graph={
            "stages": [{"blocks": list(s.blocks), "repeats": s.repeats, "function": f"stage{i}"}
                       for i, s in enumerate(model.recursion.stages)],
            "relax_functions": sum(1 for gv in mod.functions if not isinstance(mod[gv], tvm.tirx.PrimFunc)),
            "tir_kernels": sum(1 for gv in mod.functions if isinstance(mod[gv], tvm.tirx.PrimFunc)),
            "tile": tile,
            "param_bytes": int(sum(a.nbytes for a in params.arrays)),
            "compile_s": round(compile_s, 2),
            # GPUs: grid x block of every kernel (tvm_gpu_check), and which kernels are matmul-like
            **({"kernels_launch": launches, "dense_kernels": graph.dense_kernels} if launches else {}),
        },
        kernels=tuple(sorted(graph.kernels)),
    )


def entry_points(model, host_loop: bool) -> dict:
    """The library's functions as contract entry points (arguments in call order, by role)."""
    from edgeloop.runtimes.contract import EntryPoint, TensorSpec as T

    s = model.spec
    kv, params = T("kv", "kv_cache", "object"), T("params", "params", "tuple")
    cache = EntryPoint("create_kv_cache", (T("cfg", "kv_config", "shape"),), (kv,))
    out = {
        "create_kv_cache": cache,
        "forward": EntryPoint("forward", (T("ids", "input_ids", "int32", ("tokens",)), kv,
                                          T("logit_pos", "logit_positions", "int32", ("n",)), params),
                              (T("logits", "logits", "float32", ("n", s.vocab_size)),)),
        "decode": EntryPoint("decode", (T("ids", "input_ids", "int32", (1,)), kv, params),
                             (T("logits", "logits", "float32", (1, s.vocab_size)),)),
    }
    if host_loop:
        hidden = T("x", "hidden", "float32", ("tokens", s.hidden_size))
        outputs = (T("logits", "logits", "float32", ("tokens", s.vocab_size)),)
        if s.exit_gate:
            outputs += (T("exit_score", "exit_score", "float32", ("tokens", 1)),)
        out.update({
            "create_step_kv_cache": EntryPoint("create_step_kv_cache", cache.inputs, cache.outputs),
            "prologue": EntryPoint("prologue", (T("ids", "input_ids", "int32", ("tokens",)), params), (hidden,)),
            "block": EntryPoint("block", (hidden, kv, T("depth", "depth", "int32", ("tokens",)),
                                          T("pos", "positions", "int32", ("tokens",)), params), (hidden,)),
            "kv_fill": EntryPoint("kv_fill", (hidden, kv, T("depth", "depth", "int32", ("tokens",)),
                                              T("pos", "positions", "int32", ("tokens",)), params), ()),
            "epilogue": EntryPoint("epilogue", (hidden, params), outputs),
        })
    return out
