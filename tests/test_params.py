"""Stepwise mapping and parameter counts against PAPERS.md (analytic, no weights)."""

import numpy as np
import pytest

from edgeloop.checkpoint import read_model_dir
from edgeloop.families import get_family, family_for_model_type
from edgeloop.params import count_params
from edgeloop.presets import REAL_SHAPES, hf_config
from edgeloop.recursion import RankChoice, resolve_ranks
from edgeloop.spec import Recursion, plan_stages, stepwise_layers


def test_stepwise_mapping_18_to_9():
    assert stepwise_layers(0, 17, 9) == [0, 2, 4, 6, 8, 11, 13, 15, 17]


def test_stage_plans():
    assert [(s.blocks, s.repeats) for s in plan_stages(8, 4, "cycle")] == [((0, 1), 4)]
    assert [(s.blocks, s.repeats) for s in plan_stages(4, 2, "sequence")] == [((0,), 2), ((1,), 2)]
    assert [(s.blocks, s.repeats) for s in plan_stages(6, 2, "middle-cycle")] == [((0,), 1), ((1, 2), 2), ((3,), 1)]


def _spec(name):
    config = hf_config(REAL_SHAPES[name]).to_dict()  # what config.json would hold
    return get_family(family_for_model_type(config["model_type"])).spec_from_config(config)


@pytest.mark.parametrize("name, vanilla, recursive, embedding", [
    ("gemma-2b", 1.98e9, 0.99e9, 0.52e9),
    ("tinyllama-1.1b", 0.97e9, 0.48e9, 0.13e9),
    ("pythia-1b", 0.81e9, 0.40e9, 0.21e9),
])
def test_paper_parameter_counts(name, vanilla, recursive, embedding):
    spec = _spec(name)
    rec = Recursion(sharing="cycle", loops=2, stages=plan_stages(spec.num_layers, 2, "cycle"),
                    lora_ranks={n: 0 for n in spec.linear_shapes()})
    counts = count_params(spec, rec)
    assert counts.original_non_embedding == pytest.approx(vanilla, rel=0.01)
    assert counts.shared == pytest.approx(recursive, rel=0.01)
    assert counts.embedding == pytest.approx(embedding, rel=0.02)


def test_lora_parameter_formula():
    spec = _spec("gemma-2b")
    ranks = resolve_ranks(spec, RankChoice(512))
    rec = Recursion(sharing="cycle", loops=2, stages=plan_stages(18, 2, "cycle"), lora_ranks=ranks)
    per_position = sum(min(512, o, i) * (o + i) for o, i in spec.linear_shapes().values())  # k/v cap at 256
    assert count_params(spec, rec).lora == 18 * per_position


@pytest.mark.parametrize("options", [dict(loops=2, lora_rank=8), dict(loops=2, sharing="sequence", lora_rank=3),
                                     dict(loops=1), dict(loops=2, sharing="middle-cycle", lora_rank=4)])
def test_counts_match_stored_tensors(converted, options):
    preset = "llama3" if options.get("sharing") == "middle-cycle" else "gpt_neox"
    md = read_model_dir(converted(preset, **options))
    stored = sum(int(np.prod(t.shape)) for t in md.tensors.values())
    assert count_params(md.spec, md.recursion).total == stored
