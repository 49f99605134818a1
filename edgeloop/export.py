"""`edgeloop export-merged`: a recursive model as the plain HF checkpoint it is equivalent to.

Each depth's weights are materialized (W' + B_d A_d, its own norms and biases) as an ordinary
layer, so tools that cannot express recursion (onnxruntime-genai, llama.cpp, transformers) can
run the same function. This is how such a model is deployed today, and the fair peer for
edgeloop's benchmarks: the same math, without the sharing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgeloop.checkpoint import TOKENIZER_FILES, read_model_dir
from edgeloop.errors import EdgeloopError
from edgeloop.families import get_family
from edgeloop.families.common import to_hf
from edgeloop.fileio import atomic_output_dir, read_json

HF_CONFIG = "hf_config.json"  # the original config.json, kept by `edgeloop convert`


def merged_layers(md) -> list[dict[str, np.ndarray]]:
    """One dict of edgeloop tensors per depth, with the LoRA folded into the weights."""
    spec, rec, t = md.spec, md.recursion, md.tensors
    layers = []
    for depth in rec.depths():
        prefix = f"blocks.{depth.block}."
        layer = {}
        for name in spec.linear_shapes():
            w = t[f"{prefix}{name}.weight"].astype(np.float64)
            if f"{prefix}lora.{name}.A" in t:
                w = w + t[f"{prefix}lora.{name}.B"][depth.repeat].astype(np.float64) @ t[f"{prefix}lora.{name}.A"][depth.repeat]
            layer[f"{name}.weight"] = w.astype(np.float32)
        for name in spec.vector_shapes():
            v = t[prefix + name]
            layer[name] = v[depth.repeat] if rec.per_depth_vectors else v
        layers.append(layer)
    return layers


def export_merged(model_dir: str | Path, out: str | Path, *, dtype: str = "float32", overwrite: bool = False) -> Path:
    from safetensors.numpy import save_file

    model_dir, out = Path(model_dir), Path(out)
    if dtype not in ("float32", "float16"):
        raise EdgeloopError(f"--dtype must be float32 or float16, got {dtype!r}")
    md = read_model_dir(model_dir)
    config_path = model_dir / HF_CONFIG
    if not config_path.is_file():
        raise EdgeloopError(f"{model_dir} has no {HF_CONFIG} (converted by an older edgeloop); convert it again")
    config = read_json(config_path, HF_CONFIG)
    globals_ = {k: v for k, v in md.tensors.items() if not k.startswith("blocks.")}
    tensors = to_hf(get_family(md.spec.family).weight_map(md.spec), globals_, merged_layers(md))
    with atomic_output_dir(out, overwrite=overwrite, inputs=(model_dir,)) as tmp:
        save_file({k: v.astype(dtype) for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        config["torch_dtype"] = config["dtype"] = dtype
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for name in TOKENIZER_FILES:
            if (model_dir / name).is_file():
                (tmp / name).write_bytes((model_dir / name).read_bytes())
    return out
