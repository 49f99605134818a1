"""Artifact directories: a versioned manifest with checksums, backend files, tokenizer.

Layout (DESIGN.md section 2)::

    ARTIFACT/
      edgeloop.json      manifest: model description, backend, target, I/O contract, sha256 of every file
      model.onnx ...     backend files (listed in the manifest)
      tokenizer.json ... tokenizer and generation defaults

Written into a temporary directory and renamed at the end: never half an artifact.
"""

from __future__ import annotations

from pathlib import Path

from edgeloop.checkpoint import copy_tokenizer_files
from edgeloop.fileio import atomic_output_dir, sha256_file, write_json
from edgeloop.runtimes.artifact import FORMAT, FORMAT_VERSION, MANIFEST


def write_artifact(out: Path, model, options, build, *, overwrite: bool = False) -> dict:
    """Run `build(model, options, tmpdir) -> backend manifest section` and finish the artifact."""
    import edgeloop

    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        backend_section = build(model, options, tmp)
        copy_tokenizer_files(model.path, tmp)
        files = {str(p.relative_to(tmp)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "edgeloop_version": edgeloop.__version__,
            "backend": options.backend,
            "target": options.target,
            "options": options.to_dict(),
            "model": model.spec.to_dict(),
            "recursion": model.recursion.to_dict(),
            "generation": model.generation,
            **backend_section,
            "files": files,
        }
        write_json(tmp / MANIFEST, manifest)
    return manifest
