"""edgeloop: compile and run Relaxed Recursive Transformers on devices.

    import edgeloop
    edgeloop.convert("hf_checkpoint", "model", loops=4, lora_rank=32)   # needs edgeloop[convert]
    edgeloop.compile("model", "artifact")                               # needs edgeloop[convert]
    m = edgeloop.load("artifact")                                       # base install
    print(m.generate("In the beginning", max_new_tokens=32))

Heavy modules are imported lazily so that loading an artifact never imports torch.
"""

from edgeloop.api import load
from edgeloop.errors import EdgeloopError

__version__ = "0.1.0"
__all__ = ["load", "convert", "compile", "EdgeloopError", "__version__"]


def convert(hf_dir, out, options=None, **kwargs):
    """Convert a Hugging Face checkpoint into a recursive edgeloop model dir (options: `edgeloop.converter.ConvertOptions`)."""
    from edgeloop.converter import convert as _convert

    return _convert(hf_dir, out, options, **kwargs)


def compile(model_dir, out, options=None, **kwargs):  # noqa: A001 - mirrors the CLI verb
    """Compile a model dir into a runnable artifact."""
    from edgeloop.compiler import compile_model

    return compile_model(model_dir, out, options, **kwargs)
