"""Opening artifacts: manifest checks, checksums, then the backend driver the manifest names."""

from __future__ import annotations

from pathlib import Path

from edgeloop.errors import EdgeloopError
from edgeloop.fileio import read_json, sha256_file

FORMAT = "edgeloop-artifact"
FORMAT_VERSION = 1
MANIFEST = "edgeloop.json"


def read_manifest(path: Path) -> dict:
    manifest = read_json(Path(path) / MANIFEST, "artifact manifest")
    if manifest.get("format") != FORMAT:
        raise EdgeloopError(f"{path}/{MANIFEST} is not an edgeloop artifact manifest")
    if manifest.get("version", 0) > FORMAT_VERSION:
        raise EdgeloopError(f"{path} needs a newer edgeloop (artifact format {manifest['version']}); upgrade edgeloop")
    for key in ("backend", "model", "recursion", "files"):
        if key not in manifest:
            raise EdgeloopError(f"{path}/{MANIFEST} lacks {key!r}; the artifact is corrupt, compile it again")
    return manifest


def verify_files(path: Path, manifest: dict) -> None:
    """Every listed file exists with its recorded size and sha256."""
    for name, info in manifest["files"].items():
        f = Path(path) / name
        if not f.is_file():
            raise EdgeloopError(f"artifact file {name} is missing from {path}; compile the artifact again")
        if f.stat().st_size != info["bytes"]:
            raise EdgeloopError(f"artifact file {name} has {f.stat().st_size} bytes, the manifest says "
                                f"{info['bytes']}: it is truncated or modified; compile the artifact again")
        if sha256_file(f) != info["sha256"]:
            raise EdgeloopError(f"checksum mismatch for {name} in {path}: the file was modified or corrupted; "
                                "compile the artifact again")


def load_artifact(path: Path, *, verify: bool = True, **backend_options):
    from edgeloop.runtimes.backend import backend_class
    from edgeloop.runtimes.model import Model

    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    backend = backend_class(manifest["backend"])(path, manifest, **backend_options)
    return Model(backend, path, manifest.get("generation", {}), manifest)


def describe_artifact(path: Path) -> dict:
    from edgeloop.inspection import describe_model
    from edgeloop.spec import ModelSpec, Recursion

    manifest = read_manifest(path)
    info = {"path": str(path), "kind": "edgeloop artifact", "backend": manifest["backend"],
            "target": manifest.get("target"), "layout": manifest.get("layout"),
            "quantization": manifest.get("quantization", {"scheme": "none"})}
    info.update(describe_model(ModelSpec.from_dict(manifest["model"]), Recursion.from_dict(manifest["recursion"])))
    for key in ("graph", "quality", "kernels"):
        if key in manifest:
            info[key] = manifest[key]
    info["files"] = {name: f["bytes"] for name, f in manifest["files"].items()}
    info["total_bytes"] = sum(f["bytes"] for f in manifest["files"].values())
    return info
