"""Opening artifacts: the contract (manifest, digest, schema, confinement), checksums, then the driver."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from edgeloop.runtimes.contract import MANIFEST, load, verify_files

__all__ = ["MANIFEST", "load_artifact", "describe_artifact"]


def load_artifact(path: Path, *, verify: bool = True, **backend_options):
    from edgeloop.runtimes.backend import backend_class
    from edgeloop.runtimes.model import Model

    path = Path(path)
    contract = load(path)
    if verify:
        verify_files(path, contract)
    backend = backend_class(contract.backend)(path, contract, **backend_options)
    return Model(backend, path, contract.generation, contract, tokenizer=contract.tokenizer)


def describe_artifact(path: Path) -> dict:
    from edgeloop.params import describe_model

    contract = load(Path(path))
    info = {"path": str(path), "kind": "edgeloop artifact", "backend": contract.backend, "target": contract.target,
            "layout": contract.layout, "quantization": contract.quantization or {"scheme": "none"}}
    info.update(describe_model(contract.model, contract.recursion))
    info["compiled_by"] = f"edgeloop {contract.edgeloop_version}"
    info["entry_points"] = sorted(contract.entry_points)
    info["loop"] = asdict(contract.loop)
    info["kv_cache"] = {k: v for k, v in asdict(contract.kv).items() if k != "entries"}
    section = contract.onnx or contract.tvm
    info[contract.backend] = {k: v for k, v in asdict(section).items() if k != "param_names"}
    if contract.options:
        info["options"] = contract.options
    if contract.exit:
        info["exit"] = asdict(contract.exit)
    for key in ("graph", "quality"):
        if getattr(contract, key):
            info[key] = getattr(contract, key)
    if contract.kernels:
        info["kernels"] = list(contract.kernels)
    info["files"] = {name: f.bytes for name, f in contract.files.items()}
    info["total_bytes"] = sum(f.bytes for f in contract.files.values())
    return info
