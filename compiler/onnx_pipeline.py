"""`build` for backend "onnxruntime": the model's graphs through a flat list of named passes.

    for each entry point: build graph -> quantize -> save -> check      (graph passes)
    then: optimize -> share weights -> ort format                       (artifact passes)

The graph passes finish one entry point's graph (in memory, then on disk) before the next is
built: the forward graph, the block steps and kv_fill each carry the shared weights, and holding
them all at once took ~10x the model's size in memory (24 GB for a 2.5 GB TinyLlama-shape model).
The artifact passes work on the saved graphs together. `--debug-dump DIR` writes every graph
after every pass (`DIR/NN-pass/ENTRY.txt`). The targets are one table
(`ONNX_TARGETS`): what a target changes (dtype, offline optimization, ORT format, provider) is
data there, not checks scattered over the passes.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from edgeloop.compiler.onnx_build import KV_CHUNK, BuiltGraph, build_graphs, fused_kv_entries, graph_stats
from edgeloop.errors import EdgeloopError
from edgeloop.runtimes.contract import KVEntry, KVLayout, OnnxSection

OPSET = 23
WEIGHTS_FILE = "weights.onnx.data"


@dataclass(frozen=True)
class OnnxTarget:
    name: str
    float_dtype: str  # graphs' float type
    execution_provider: str
    offline_optimization: str  # ORT optimization level applied at compile time ("none": at load)
    ort_format: bool  # also write ORT-format models and the required-operators list (reduced builds)
    quantization: bool  # --quant / --lora-dtype int8 allowed (they need float32 graphs)


# Offline optimization runs ORT's CPU provider; for CUDA graphs it would insert fp16->fp32 casts
# for kernels the CPU lacks, so CUDA graphs are optimized when the session loads.
ONNX_TARGETS = {
    "cpu": OnnxTarget("cpu", "float32", "CPUExecutionProvider", "extended", False, True),
    "mobile": OnnxTarget("mobile", "float32", "CPUExecutionProvider", "extended", True, True),
    "cuda": OnnxTarget("cuda", "float16", "CUDAExecutionProvider", "none", False, False),
}


@dataclass
class Program:
    """What the passes know of the artifact: its entry points' graphs (built, quantized and saved one
    at a time) and what the passes found out."""

    graphs: list[BuiltGraph] = field(default_factory=list)  # in the order they were built
    quantization: dict = field(default_factory=lambda: {"scheme": "none"})
    stats: dict = field(default_factory=dict)  # the forward graph's, as saved
    fp32_stats: dict | None = None
    fp32_forward: Path | None = None  # the unquantized forward graph on disk (quality reference)
    packed: dict = field(default_factory=dict)  # quantized weights by content, shared by the graphs
    ort_models: dict[str, str] = field(default_factory=dict)
    required_operators: str | None = None

    @property
    def inplace(self) -> bool:
        """The forward graph writes its KV in place."""
        return any(g.kv_inplace for g in self.graphs)


@dataclass
class GraphUnit:
    """One entry point's graph while the graph passes run on it: in memory until `save`, then on disk."""

    graph: BuiltGraph
    proto: onnx.ModelProto | None
    kinds: dict[str, str]

    @property
    def name(self) -> str:
        return self.graph.name


def target_of(options) -> OnnxTarget:
    return ONNX_TARGETS[options.target]


# ---------------------------------------------------------------------------------------------
# graph passes: one graph at a time, so a large model holds one graph's weights in memory


def quantize(prog: Program, unit: GraphUnit, model, options, out_dir: Path) -> None:
    if not options.quantizes:
        return
    from edgeloop.compiler.onnx_quant import quantize_graph

    if unit.name == "forward":  # kept on disk, not in memory, for the quality measurement
        prog.fp32_stats = graph_stats(unit.proto, unit.kinds)
        work = Path(tempfile.mkdtemp(prefix=".fp32-", dir=out_dir))  # removed by `_quality`
        prog.fp32_forward = work / "fp32.onnx"
        onnx.save_model(unit.proto, str(prog.fp32_forward), save_as_external_data=True,
                        all_tensors_to_one_file=True, location="fp32.onnx.data", size_threshold=1024)
        unit.proto = onnx.load(str(prog.fp32_forward))  # saving moved the weights out of the proto
    unit.proto, unit.kinds, info = quantize_graph(unit.proto, unit.kinds, model, options, in_place=True,
                                                  cache=prog.packed)
    if unit.name == "forward":
        prog.quantization = info


def save(prog: Program, unit: GraphUnit, model, options, out_dir: Path) -> None:
    onnx.save_model(unit.proto, str(out_dir / unit.graph.file), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=f"{unit.graph.file}.data", size_threshold=1024)
    unit.proto = None  # the weights were written out of it; the file is the graph from here on


def check(prog: Program, unit: GraphUnit, model, options, out_dir: Path) -> None:
    path = out_dir / unit.graph.file
    try:  # by path: the checker reads graphs beyond protobuf's 2 GB limit that way
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:  # a bug in edgeloop, not a user error
        raise RuntimeError(f"edgeloop built an invalid ONNX graph ({unit.name}): {e}") from e
    if unit.name == "forward":
        prog.stats = graph_stats(onnx.load(str(path), load_external_data=False), unit.kinds)


# ---------------------------------------------------------------------------------------------
# artifact passes: the saved graphs together


def optimize(prog: Program, model, options, out_dir: Path) -> Program:
    """Let ORT apply its graph optimizations once, at compile time, and save the result."""
    level = target_of(options).offline_optimization
    if not options.optimize or level == "none":
        return prog
    import onnxruntime as ort

    for g in prog.graphs:
        src = out_dir / g.file
        with tempfile.TemporaryDirectory(dir=out_dir) as work:
            moved = Path(work) / g.file
            src.rename(moved)
            (out_dir / f"{g.file}.data").rename(Path(work) / f"{g.file}.data")
            so = ort.SessionOptions()
            so.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                           "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}[level]
            so.optimized_model_filepath = str(src)
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{g.file}.data")
            so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
            # Constant folding would turn fp16-stored LoRA (+ Cast) back into fp32 initializers, and
            # fold the per-depth stacks of Loop bodies and the block step into new tensors, which would
            # then be stored next to the per-depth ones the other entry points read (ORT folds them
            # when the session loads instead).
            nodes = onnx.load(str(moved), load_external_data=False).graph.node
            stacked = any(n.op_type == "Concat" and (".per_depth." in n.output[0] or n.output[0].startswith("rope_"))
                          for n in nodes)
            disabled = ["ConstantFolding"] if options.lora_dtype == "float16" or stacked else []
            try:
                ort.InferenceSession(str(moved), so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
            except Exception as e:  # ORT raises its own exception types
                raise RuntimeError(f"onnxruntime could not load the graph edgeloop built ({g.name}): {e}") from e
    return prog


def share_weights(prog: Program, model, options, out_dir: Path) -> Program:
    """One data file for every entry point: identical tensors (the shared block, the embedding read by
    both the prologue and the head) are stored once and referenced by offset from each graph."""
    blobs: dict[bytes, tuple[int, int]] = {}  # sha256 of the bytes -> (offset, length) in the shared file
    with open(out_dir / WEIGHTS_FILE, "wb") as data:
        for g in prog.graphs:
            path = out_dir / g.file
            proto = onnx.load(str(path), load_external_data=False)
            source = out_dir / f"{g.file}.data"
            raw = np.memmap(source, dtype=np.uint8, mode="r") if source.is_file() and source.stat().st_size else b""
            for tensor in _all_initializers(proto.graph):
                if tensor.data_location != onnx.TensorProto.EXTERNAL:
                    continue
                info = {e.key: e.value for e in tensor.external_data}
                offset, length = int(info.get("offset", 0)), int(info["length"])
                blob = bytes(raw[offset:offset + length])
                key = hashlib.sha256(blob).digest()
                if key not in blobs:
                    data.write(b"\0" * ((-data.tell()) % 64))  # aligned, as ORT's own writer does
                    blobs[key] = (data.tell(), len(blob))
                    data.write(blob)
                where = blobs[key]
                del tensor.external_data[:]
                for key, value in (("location", WEIGHTS_FILE), ("offset", str(where[0])), ("length", str(where[1]))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value
            onnx.save_model(proto, str(path))
            del raw
            source.unlink(missing_ok=True)
    return prog


def _all_initializers(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_initializers(attr.g)


def ort_format(prog: Program, model, options, out_dir: Path) -> Program:
    """ORT-format models for the mobile runtime plus the operator list for a reduced ORT build."""
    if not target_of(options).ort_format:
        return prog
    with tempfile.TemporaryDirectory(dir=out_dir) as work:
        work = Path(work)
        for g in prog.graphs:
            shutil.copy2(out_dir / g.file, work / g.file)
        shutil.copy2(out_dir / WEIGHTS_FILE, work / WEIGHTS_FILE)
        cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(work),
               "--output_dir", str(work / "ort"), "--optimization_style", "Fixed"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise EdgeloopError(f"ORT-format conversion failed: {(res.stderr.strip().splitlines() or [''])[-1]}")
        for g in prog.graphs:
            produced = work / "ort" / g.file.replace(".onnx", ".ort")
            if not produced.is_file():
                raise EdgeloopError(f"ORT-format conversion produced no {produced.name}")
            shutil.copy2(produced, out_dir / produced.name)
            prog.ort_models[g.name] = produced.name
        configs = list((work / "ort").glob("*.config"))
        if configs:
            shutil.copy2(configs[0], out_dir / "required_operators.config")
            prog.required_operators = "required_operators.config"
    return prog


GRAPH_PASSES = [("quantize", quantize), ("save", save), ("check", check)]
ARTIFACT_PASSES = [("optimize", optimize), ("share_weights", share_weights), ("ort_format", ort_format)]
PASSES = GRAPH_PASSES + ARTIFACT_PASSES


def _dump_graph(proto: onnx.ModelProto, name: str, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"{name}.txt").write_text(onnx.printer.to_text(proto.graph))


def _dump_saved(prog: Program, out_dir: Path, dest: Path) -> None:
    for g in prog.graphs:
        _dump_graph(onnx.load(str(out_dir / g.file), load_external_data=False), g.name, dest)


# ---------------------------------------------------------------------------------------------
# the backend entry point


def build(model, options, out_dir: Path):
    """Backend entry point (see edgeloop.compiler.BACKENDS): graphs, passes, contract sections."""
    from edgeloop.compiler.artifact import BackendResult, loop_state

    target = target_of(options)
    if options.quantizes and not target.quantization:
        raise EdgeloopError(f"--quant {options.quant} / --lora-dtype int8 need float32 graphs; the {target.name} "
                            "target builds float16 (use --target cpu or mobile)")
    float_dtype = np.dtype(target.float_dtype)
    # int8 LoRA is built float and packed by the quantization rewrite, like the shared weights
    lora_dtype = np.float16 if options.lora_dtype == "float16" else float_dtype
    dump = Path(options.debug_dump) if options.debug_dump else None
    prog = Program()
    for graph in build_graphs(model.spec, model.recursion, model.tensors, layout=options.layout,
                              float_dtype=float_dtype, lora_dtype=lora_dtype,
                              block_lora_dtype=np.float16 if options.lora_dtype == "int8" else None):
        prog.graphs.append(graph)
        unit = GraphUnit(graph, graph.model(), graph.kinds)
        if dump:
            _dump_graph(unit.proto, unit.name, dump / "00-build")
        for i, (name, step) in enumerate(GRAPH_PASSES, start=1):
            step(prog, unit, model, options, out_dir)
            if dump:
                dest = dump / f"{i:02d}-{name}"
                if unit.proto is not None:
                    _dump_graph(unit.proto, unit.name, dest)
                else:
                    _dump_graph(onnx.load(str(out_dir / graph.file), load_external_data=False), unit.name, dest)
        del unit  # the next graph is built only now
    for i, (name, step) in enumerate(ARTIFACT_PASSES, start=len(GRAPH_PASSES) + 1):
        prog = step(prog, model, options, out_dir)
        if dump:
            _dump_saved(prog, out_dir, dump / f"{i:02d}-{name}")

    entries = {g.name: g.builder.entry_point(g.file) for g in prog.graphs}
    result = BackendResult(
        layout=options.layout,
        loop=loop_state(model),
        kv=kv_layout(model, options.layout, prog.inplace, float_dtype),
        entry_points=entries,
        onnx=OnnxSection(data_files=(WEIGHTS_FILE,), execution_provider=target.execution_provider,
                         offline_optimization=target.offline_optimization if options.optimize else "none",
                         opset=OPSET, ort_models=dict(prog.ort_models), required_operators=prog.required_operators),
        quantization=prog.quantization,
        graph=prog.stats,
    )
    if prog.fp32_forward is not None:
        result.quality = _quality(prog, result, model, options, out_dir)
    return result


def kv_layout(model, layout: str, inplace: bool, float_dtype) -> KVLayout:
    spec, rec = model.spec, model.recursion
    entries = tuple(KVEntry(eid, depths) for eid, depths in fused_kv_entries(rec, layout))
    return KVLayout(kind="host", dtype=np.dtype(float_dtype).name, kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                    num_depths=rec.num_depths, max_context=spec.max_position, entries=entries,
                    stacked=any(len(e.depths) > 1 for e in entries), inplace=inplace, capacity_chunk=KV_CHUNK)


def _quality(prog: Program, result, model, options, out_dir: Path) -> dict:
    """The quantized forward graph against the fp32 one, both run by the ORT driver."""
    from edgeloop.compiler.artifact import provisional_contract
    from edgeloop.compiler.onnx_quant import measure_quality

    try:
        contract = provisional_contract(model, options, result)
        quality = measure_quality(contract, out_dir, prog.fp32_forward, model, options)
    finally:
        shutil.rmtree(prog.fp32_forward.parent, ignore_errors=True)
    weights = (sum(prog.fp32_stats["bytes_by_kind"].values()), sum(prog.stats["bytes_by_kind"].values()))
    quality["weight_bytes_fp32"], quality["weight_bytes"] = weights
    quality["size_vs_fp32"] = round(weights[1] / weights[0], 4)
    return quality
