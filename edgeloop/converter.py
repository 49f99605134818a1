"""`edgeloop convert`: a Hugging Face checkpoint -> a recursive (relaxed) edgeloop model dir."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from edgeloop.checkpoint import generation_defaults, read_hf_checkpoint, write_model_dir
from edgeloop.errors import EdgeloopError
from edgeloop.fileio import atomic_output_dir, check_output, read_text
from edgeloop.params import ParamCounts, count_params
from edgeloop.recursion import RankChoice, build_recursive, parse_rank
from edgeloop.spec import ModelSpec, Recursion


HELDOUT = "heldout.txt"


@dataclass(frozen=True)
class ConvertOptions:
    loops: int = 1  # B; 1 keeps the vanilla model
    sharing: str = "cycle"
    init: str = "average"
    lora_rank: int | str = 0  # int or "full"; 0 = strict recursion
    lora_rank_attn: int | str | None = None
    lora_rank_mlp: int | str | None = None
    share_norms: bool | None = None  # None: per-depth vectors exactly when LoRA is on
    svd_dtype: str = "float32"
    svd: str = "auto"  # auto | exact | randomized (recursion.svd_lora)


@dataclass
class ConvertResult:
    path: Path
    spec: ModelSpec
    recursion: Recursion
    params: ParamCounts
    notes: list[str] = field(default_factory=list)


def native_recursion(ckpt, options: ConvertOptions):
    from edgeloop.checkpoint import vanilla_recursion

    steps = ckpt.spec.native_loops
    if options.loops not in (1, steps) or parse_rank(options.lora_rank) not in (0, None):
        raise EdgeloopError(f"{ckpt.path} is already looped {steps} times ({ckpt.spec.family}); convert keeps its own "
                            "loop (pass no --loops and no --lora-rank)")
    tensors = dict(ckpt.globals)
    for i, layer in enumerate(ckpt.layers):
        tensors.update({f"blocks.{i}.{k}": v for k, v in layer.items()})
    return vanilla_recursion(ckpt.spec), tensors


def convert(hf_dir: str | Path, out: str | Path, options: ConvertOptions | None = None, *, overwrite: bool = False,
            progress: bool = False, **kwargs) -> ConvertResult:
    """Convert `hf_dir` into an edgeloop model dir at `out` (written atomically).

    Options may be given as a `ConvertOptions` or as keyword arguments with the same names.
    """
    options = options or ConvertOptions(**kwargs)
    hf_dir, out = Path(hf_dir), Path(out)
    ranks = RankChoice(parse_rank(options.lora_rank), parse_rank(options.lora_rank_attn), parse_rank(options.lora_rank_mlp))
    check_output(out, (hf_dir,))  # before minutes of work: an output that would destroy the input
    ckpt = read_hf_checkpoint(hf_dir)
    generation = generation_defaults(hf_dir, ckpt.config)
    if (hf_dir / "tokenizer.json").is_file() or (hf_dir / "tokenizer_config.json").is_file():
        from edgeloop.runtimes.tokenizer import resolve_tokenizer

        resolve_tokenizer(hf_dir, generation, ckpt.spec.vocab_size)  # a broken tokenizer fails now, not at run time
    if ckpt.spec.native_loops > 1:  # already looped (Ouro): its own layers, its own loop count, no LoRA
        recursion, tensors = native_recursion(ckpt, options)
    else:
        recursion, tensors = build_recursive(
            ckpt.spec, ckpt.globals, ckpt.layers, loops=options.loops, sharing=options.sharing, init=options.init,
            ranks=ranks, share_norms=options.share_norms, svd_dtype=options.svd_dtype, svd=options.svd,
            progress=progress)
    source = {"path": str(hf_dir.resolve()), "model_type": ckpt.config.get("model_type"),
              "num_layers": ckpt.spec.num_layers}
    with atomic_output_dir(out, overwrite=overwrite, inputs=(hf_dir,)) as tmp:
        write_model_dir(tmp, ckpt.spec, recursion, tensors, generation=generation, source=source,
                        tokenizer_from=hf_dir)
        # kept so `edgeloop export-merged` can write the equivalent vanilla checkpoint
        shutil.copy2(hf_dir / "config.json", tmp / "hf_config.json")
        if (hf_dir / HELDOUT).is_file():  # held-out text shipped with a checkpoint: quality reports use it
            read_text(hf_dir / HELDOUT, "held-out text")
            shutil.copy2(hf_dir / HELDOUT, tmp / HELDOUT)
    notes = []
    if not (hf_dir / "tokenizer.json").is_file():
        notes.append("no tokenizer.json in the checkpoint: generate() from text will not work, logits() will")
    return ConvertResult(out, ckpt.spec, recursion, count_params(ckpt.spec, recursion), notes)
