"""`edgeloop inspect`: what a model dir, HF checkpoint or artifact contains, as a dict."""

from __future__ import annotations

from pathlib import Path

from edgeloop.errors import EdgeloopError
from edgeloop.fileio import dir_size, require_dir
from edgeloop.params import describe_model
from edgeloop.runtimes.artifact import MANIFEST, describe_artifact
from edgeloop.spec import ModelSpec, Recursion


def inspect_path(path: str | Path) -> dict:
    path = require_dir(Path(path), "path to inspect")
    if (path / MANIFEST).is_file():
        return describe_artifact(path)
    if not (path / "config.json").is_file():
        raise EdgeloopError(f"{path} is not a model dir, HF checkpoint or artifact (no config.json / edgeloop.json)")
    from edgeloop.checkpoint import is_model_dir, read_hf_spec, read_model_config, vanilla_recursion

    if is_model_dir(path):
        cfg = read_model_config(path)
        spec, recursion = ModelSpec.from_dict(cfg["model"]), Recursion.from_dict(cfg["recursion"])
        kind = "edgeloop model"
    else:
        _, spec = read_hf_spec(path)
        recursion = vanilla_recursion(spec)
        kind = "Hugging Face checkpoint"
    files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
    return {"path": str(path), "kind": kind, **describe_model(spec, recursion), "files": files,
            "total_bytes": dir_size(path)}

