"""Llama 2/3 (incl. llama3 rope scaling), TinyLlama, SmolLM and Mistral (same layout)."""

from edgeloop.families.common import (WeightMap, check_dims, llama_style_globals, llama_style_layer_map,
                                      llama_style_spec_kwargs)
from edgeloop.spec import ModelSpec

MODEL_TYPES = ("llama", "mistral")


def spec_from_config(config: dict) -> ModelSpec:
    kw = llama_style_spec_kwargs(config)
    spec = ModelSpec(
        family="llama",
        qkv_bias=bool(config.get("attention_bias", False)),
        o_bias=bool(config.get("attention_bias", False)),
        mlp_bias=bool(config.get("mlp_bias", False)),
        sliding_window=config.get("sliding_window") if config.get("model_type") == "mistral" else None,
        **kw,
    )
    check_dims(config, spec)
    return spec


def weight_map(spec: ModelSpec) -> WeightMap:
    return WeightMap(llama_style_globals(spec), llama_style_layer_map(spec), ("rotary_emb.inv_freq",))
