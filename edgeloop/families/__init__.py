"""Model families: one module per family, registered in one dict.

A family module provides `MODEL_TYPES` (the Hugging Face `model_type` values it reads),
`spec_from_config(config) -> ModelSpec` and `weight_map(spec) -> WeightMap`. Nothing else
in edgeloop branches on the family.
"""

from __future__ import annotations

from types import ModuleType

from edgeloop.errors import EdgeloopError
from edgeloop.families import gemma, gpt_neox, llama, ouro, qwen2, qwen3

FAMILIES: dict[str, ModuleType] = {
    "llama": llama,
    "qwen2": qwen2,
    "qwen3": qwen3,
    "gemma": gemma,
    "gpt_neox": gpt_neox,
    "ouro": ouro,
}

_BY_MODEL_TYPE = {t: name for name, mod in FAMILIES.items() for t in mod.MODEL_TYPES}


def family_for_model_type(model_type: str | None) -> str:
    if model_type not in _BY_MODEL_TYPE:
        raise EdgeloopError(
            f"unsupported model_type {model_type!r} in config.json; edgeloop converts "
            f"{', '.join(sorted(_BY_MODEL_TYPE))}")
    return _BY_MODEL_TYPE[model_type]


def get_family(name: str) -> ModuleType:
    if name not in FAMILIES:
        raise EdgeloopError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]
