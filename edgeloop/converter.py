"""`edgeloop convert`: a Hugging Face checkpoint -> a recursive (relaxed) edgeloop model dir."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from edgeloop.checkpoint import generation_defaults, read_hf_checkpoint, write_model_dir
from edgeloop.fileio import atomic_output_dir
from edgeloop.params import ParamCounts, count_params
from edgeloop.recursion import RankChoice, build_recursive, parse_rank
from edgeloop.spec import ModelSpec, Recursion


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


def convert(hf_dir: str | Path, out: str | Path, options: ConvertOptions | None = None, *, overwrite: bool = False,
            progress: bool = False, **kwargs) -> ConvertResult:
    """Convert `hf_dir` into an edgeloop model dir at `out` (written atomically).

    Options may be given as a `ConvertOptions` or as keyword arguments with the same names.
    """
    options = options or ConvertOptions(**kwargs)
    hf_dir, out = Path(hf_dir), Path(out)
    ranks = RankChoice(parse_rank(options.lora_rank), parse_rank(options.lora_rank_attn), parse_rank(options.lora_rank_mlp))
    ckpt = read_hf_checkpoint(hf_dir)
    recursion, tensors = build_recursive(
        ckpt.spec, ckpt.globals, ckpt.layers, loops=options.loops, sharing=options.sharing, init=options.init,
        ranks=ranks, share_norms=options.share_norms, svd_dtype=options.svd_dtype, svd=options.svd, progress=progress)
    source = {"path": str(hf_dir.resolve()), "model_type": ckpt.config.get("model_type"),
              "num_layers": ckpt.spec.num_layers}
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        write_model_dir(tmp, ckpt.spec, recursion, tensors, generation=generation_defaults(hf_dir, ckpt.config),
                        source=source, tokenizer_from=hf_dir)
        # kept so `edgeloop export-merged` can write the equivalent vanilla checkpoint
        shutil.copy2(hf_dir / "config.json", tmp / "hf_config.json")
    notes = []
    if not (hf_dir / "tokenizer.json").is_file():
        notes.append("no tokenizer.json in the checkpoint: generate() from text will not work, logits() will")
    return ConvertResult(out, ckpt.spec, recursion, count_params(ckpt.spec, recursion), notes)
