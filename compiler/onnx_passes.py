"""The ONNX pipeline after graph construction, as a flat list of small steps.

check -> (quantize) -> save with external data -> offline ORT optimization -> target extras
(ORT format + required operators for mobile). `--debug-dump` keeps the graph after each step.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import onnx

from edgeloop.compiler.onnx_build import DATA_FILE, MODEL_FILE, graph_stats
from edgeloop.errors import EdgeloopError


def finish_onnx(g, io: dict, model, options, out_dir: Path) -> dict:
    proto = g.model()
    kinds = dict(g.root.initializer_kind)
    quant_info = {"scheme": "none"}
    fp32, quality = None, None
    if options.quantizes:
        from edgeloop.compiler.onnx_quant import quantize_graph

        fp32, fp32_stats = proto, graph_stats(proto, kinds)
        proto, kinds, quant_info = quantize_graph(proto, kinds, model, options)
    check(proto)
    stats = graph_stats(proto, kinds)
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as work:
        work = Path(work)
        save(proto, work / MODEL_FILE)
        if options.debug_dump:
            _dump(work / MODEL_FILE, out_dir / "debug" / "01-built")
        src = work / MODEL_FILE
        optimization = "none"
        # Offline optimization runs ORT's CPU provider; for CUDA graphs it would insert fp16->fp32
        # casts for kernels the CPU lacks, so CUDA artifacts are optimized when the session loads.
        if options.optimize and options.target != "cuda":
            optimization = "extended"
            # Constant folding would turn fp16-stored LoRA (+ Cast) back into fp32 initializers.
            keep_fp16 = options.lora_dtype == "float16"
            optimize_offline(src, out_dir / MODEL_FILE, optimization,
                             disabled=["ConstantFolding"] if keep_fp16 else None)
        else:
            shutil.copy2(src, out_dir / MODEL_FILE)
            shutil.copy2(work / DATA_FILE, out_dir / DATA_FILE)
        if fp32 is not None:  # quality vs the fp32 graph, every time (onnx_quant.measure_quality)
            quality = _quality(fp32, fp32_stats, stats, work, io, model, options, out_dir)
    section = {
        "layout": io["layout"],
        "io": io,
        "graph": stats,
        "quantization": quant_info,
        "onnx": {"model": MODEL_FILE, "data": DATA_FILE, "offline_optimization": optimization,
                 "opset": 23, "execution_provider": "CUDAExecutionProvider" if options.target == "cuda"
                 else "CPUExecutionProvider"},
    }
    if quality is not None:
        section["quality"] = quality
    if options.target == "mobile":
        section["onnx"].update(to_ort_format(out_dir))
    return section


def _quality(fp32, fp32_stats: dict, stats: dict, work: Path, io: dict, model, options, out_dir: Path) -> dict:
    from edgeloop.compiler.onnx_quant import measure_quality

    (work / "fp32").mkdir()
    save(fp32, work / "fp32" / MODEL_FILE)
    quality = measure_quality(work / "fp32" / MODEL_FILE, out_dir / MODEL_FILE, io, model, options)
    weights = (sum(fp32_stats["bytes_by_kind"].values()), sum(stats["bytes_by_kind"].values()))
    quality["weight_bytes_fp32"], quality["weight_bytes"] = weights
    quality["size_vs_fp32"] = round(weights[1] / weights[0], 4)
    return quality


def check(proto: onnx.ModelProto) -> None:
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:  # a bug in edgeloop, not a user error
        raise RuntimeError(f"edgeloop built an invalid ONNX graph: {e}") from e


def save(proto: onnx.ModelProto, path: Path) -> None:
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)


def optimize_offline(src: Path, dst: Path, level: str, disabled: list[str] | None = None) -> None:
    """Let ORT apply its graph optimizations once, at compile time, and save the result."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}[level]
    so.optimized_model_filepath = str(dst)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", DATA_FILE)
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled or [])
    except Exception as e:  # ORT raises its own exception types
        raise RuntimeError(f"onnxruntime could not load the graph edgeloop built: {e}") from e


def to_ort_format(out_dir: Path) -> dict:
    """model.ort for the mobile runtime plus the operator list for a reduced ORT build."""
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as work:
        work = Path(work)
        shutil.copy2(out_dir / MODEL_FILE, work / MODEL_FILE)
        shutil.copy2(out_dir / DATA_FILE, work / DATA_FILE)
        cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(work / MODEL_FILE),
               "--output_dir", str(work / "ort"), "--optimization_style", "Fixed"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        ort_files = list((work / "ort").glob("*.ort"))
        if res.returncode != 0 or not ort_files:
            raise EdgeloopError(f"ORT-format conversion failed: {res.stderr.strip().splitlines()[-1:] or res.stdout}")
        shutil.copy2(ort_files[0], out_dir / "model.ort")
        configs = list((work / "ort").glob("*.config"))
        if configs:
            shutil.copy2(configs[0], out_dir / "required_operators.config")
    return {"ort_model": "model.ort", "required_operators": "required_operators.config"}


def _dump(model_path: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    proto = onnx.load(str(model_path), load_external_data=False)
    (dest / "graph.txt").write_text(onnx.printer.to_text(proto.graph))
