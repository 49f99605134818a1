"""edgeloop.compiler: lower an edgeloop model dir to a runnable artifact.

Backends are looked up in `BACKENDS` (name -> "module:function"); each builder receives the
model (spec, recursion, tensors), the options and a fresh temporary directory, writes its
files there and returns its sections of the artifact contract (`artifact.BackendResult`).
`compile_model` does the rest: reading the model, the tokenizer, the contract with checksums,
the atomic rename.
"""

from __future__ import annotations

from pathlib import Path

from edgeloop.compiler.options import CompileOptions
from edgeloop.registry import resolve

BACKENDS = {
    "onnxruntime": "edgeloop.compiler.onnx_pipeline:build",
    "tvm": "edgeloop.compiler.tvm_build:build",
}

__all__ = ["CompileOptions", "compile_model", "BACKENDS"]


def compile_model(model_dir: str | Path, out: str | Path, options: CompileOptions | None = None, *,
                  overwrite: bool = False, **kwargs):
    """Compile `model_dir` (an edgeloop model dir or a HF checkpoint) into the artifact dir `out`."""
    from edgeloop.compiler.artifact import write_artifact
    from edgeloop.compiler.loading import load_for_compile

    from edgeloop.fileio import check_output, read_text

    options = options or CompileOptions(**kwargs)
    options.validate()
    check_output(Path(out), (Path(model_dir),))  # before any work: an output that would destroy the input
    if options.calibration_text:
        read_text(Path(options.calibration_text), "--calibration-text")
    model = load_for_compile(Path(model_dir))
    build = resolve(BACKENDS, options.backend, "backend")
    return write_artifact(Path(out), model, options, build, overwrite=overwrite)
