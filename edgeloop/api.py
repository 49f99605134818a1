"""`edgeloop.load`: one entry point for compiled artifacts, edgeloop model dirs and HF checkpoints."""

from __future__ import annotations

from pathlib import Path

from edgeloop.errors import EdgeloopError
from edgeloop.fileio import require_dir
from edgeloop.runtimes.contract import MANIFEST as ARTIFACT_MANIFEST


def load(path: str | Path, **backend_options):
    """Load something to run: an artifact (no torch needed), or a model dir / HF dir (PyTorch reference).

    Returns an `edgeloop.runtimes.model.Model` with logits(), generate(), stream(),
    perplexity() and chat().
    """
    path = require_dir(Path(path), "model or artifact directory")
    if (path / ARTIFACT_MANIFEST).is_file():
        from edgeloop.runtimes.artifact import load_artifact

        return load_artifact(path, **backend_options)
    if not (path / "config.json").is_file():
        raise EdgeloopError(f"{path} has neither {ARTIFACT_MANIFEST} (a compiled artifact) nor config.json (a model)")
    return load_reference_model(path)


def load_reference_model(path: Path):
    """A model dir or HF checkpoint run by the PyTorch reference (needs the convert extra)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise EdgeloopError(f"{path} is a model directory, which runs on the PyTorch reference; install "
                            "edgeloop[convert], or compile it and load the artifact") from None
    from edgeloop.checkpoint import (generation_defaults, is_model_dir, read_hf_checkpoint, read_model_dir,
                                     vanilla_recursion)
    from edgeloop.reference import ReferenceBackend, ReferenceModel
    from edgeloop.runtimes.model import Model
    from edgeloop.runtimes.sampling import generation_defaults_from
    from edgeloop.runtimes.tokenizer import resolve_tokenizer

    if is_model_dir(path):
        md = read_model_dir(path)
        model = ReferenceModel(md.spec, md.recursion, md.tensors)
        gen = md.generation
    else:
        ck = read_hf_checkpoint(path)
        tensors = dict(ck.globals)
        for i, layer in enumerate(ck.layers):
            tensors.update({f"blocks.{i}.{k}": v for k, v in layer.items()})
        model = ReferenceModel(ck.spec, vanilla_recursion(ck.spec), tensors)
        gen = generation_defaults(path, ck.config)
    section, template = resolve_tokenizer(path, gen, model.spec.vocab_size)
    return Model(ReferenceBackend(model), path, generation_defaults_from(gen), tokenizer=section, template=template)
