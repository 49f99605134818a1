"""What a backend builder receives: the model description and its tensors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeloop.errors import EdgeloopError
from edgeloop.spec import ModelSpec, Recursion


@dataclass
class CompileInput:
    path: Path  # where the model (and its tokenizer files) came from
    spec: ModelSpec
    recursion: Recursion
    tensors: dict[str, np.ndarray]
    generation: dict
    source: dict | None = None  # a model dir's record of the checkpoint it was converted from


def load_for_compile(path: Path) -> CompileInput:
    from edgeloop.checkpoint import (generation_defaults, is_model_dir, read_hf_checkpoint, read_model_dir,
                                     vanilla_recursion)
    from edgeloop.fileio import require_dir

    require_dir(path, "model directory")
    if is_model_dir(path):
        md = read_model_dir(path)
        _check_finite(md.tensors, path)
        return CompileInput(path, md.spec, md.recursion, md.tensors, md.generation, md.source)
    if (path / "config.json").is_file():
        ck = read_hf_checkpoint(path)  # a vanilla checkpoint compiles as K = L, B = 1
        tensors = dict(ck.globals)
        for i, layer in enumerate(ck.layers):
            tensors.update({f"blocks.{i}.{k}": v for k, v in layer.items()})
        return CompileInput(path, ck.spec, vanilla_recursion(ck.spec), tensors, generation_defaults(path, ck.config))
    raise EdgeloopError(f"{path} has no config.json; pass an edgeloop model dir (edgeloop convert) or a HF checkpoint")


def _check_finite(tensors: dict[str, np.ndarray], path: Path) -> None:
    """A model dir edited after conversion could hold NaN or Inf weights: refuse them here, not as NaN logits."""
    for name, t in tensors.items():
        if not np.isfinite(t).all():
            raise EdgeloopError(f"tensor {name} in {path} holds NaN or Inf values; convert the model again")
