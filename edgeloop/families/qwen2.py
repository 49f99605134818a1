"""Qwen2 / Qwen2.5: the Llama layout with biases on q, k and v."""

from edgeloop.families.common import (WeightMap, check_dims, llama_style_globals, llama_style_layer_map,
                                      llama_style_spec_kwargs)
from edgeloop.spec import ModelSpec

MODEL_TYPES = ("qwen2",)


def spec_from_config(config: dict) -> ModelSpec:
    window = config.get("sliding_window") if config.get("use_sliding_window") else None
    spec = ModelSpec(family="qwen2", qkv_bias=True, sliding_window=window, **llama_style_spec_kwargs(config))
    check_dims(config, spec)
    return spec


def weight_map(spec: ModelSpec) -> WeightMap:
    return WeightMap(llama_style_globals(spec), llama_style_layer_map(spec), ("rotary_emb.inv_freq",))
