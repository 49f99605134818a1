"""Qwen3 (dense): the Llama layout with RMSNorm on per-head q and k, optional attention bias."""

from edgeloop.families.common import (WeightMap, check_dims, llama_style_globals, llama_style_layer_map,
                                      llama_style_spec_kwargs)
from edgeloop.spec import ModelSpec

MODEL_TYPES = ("qwen3",)


def spec_from_config(config: dict) -> ModelSpec:
    bias = bool(config.get("attention_bias", False))
    window = config.get("sliding_window") if config.get("use_sliding_window") else None
    spec = ModelSpec(family="qwen3", qk_norm=True, qkv_bias=bias, o_bias=bias, sliding_window=window,
                     **llama_style_spec_kwargs(config))
    check_dims(config, spec)
    return spec


def weight_map(spec: ModelSpec) -> WeightMap:
    return WeightMap(llama_style_globals(spec), llama_style_layer_map(spec), ("rotary_emb.inv_freq",))
