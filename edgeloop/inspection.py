"""`edgeloop inspect`: what a model dir, HF checkpoint or artifact contains, as a dict."""

from __future__ import annotations

from pathlib import Path

from edgeloop.errors import EdgeloopError
from edgeloop.fileio import dir_size, require_dir
from edgeloop.params import count_params
from edgeloop.spec import ModelSpec, Recursion


def describe_model(spec: ModelSpec, recursion: Recursion) -> dict:
    looped = [s for s in recursion.stages if s.repeats > 1]
    return {
        "family": spec.family,
        "layers": spec.num_layers,
        "unique_blocks": recursion.num_blocks,
        "shared_per_loop": recursion.shared_per_loop,
        "loops": recursion.loops,
        "sharing": recursion.sharing,
        "init": recursion.init,
        "stages": [{"blocks": list(s.blocks), "repeats": s.repeats} for s in recursion.stages],
        "looped_stages": len(looped),
        "lora_ranks": recursion.lora_ranks,
        "per_depth_vectors": recursion.per_depth_vectors,
        "hidden_size": spec.hidden_size,
        "heads": f"{spec.num_heads}q/{spec.num_kv_heads}kv x {spec.head_dim}",
        "vocab_size": spec.vocab_size,
        "max_position": spec.max_position,
        "params": count_params(spec, recursion).to_dict(),
    }


def inspect_path(path: str | Path) -> dict:
    path = require_dir(Path(path), "path to inspect")
    from edgeloop.runtimes.artifact import MANIFEST, describe_artifact

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

