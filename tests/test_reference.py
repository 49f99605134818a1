"""The PyTorch reference against transformers, and conversion exactness."""

import numpy as np
import pytest
import torch

import edgeloop
from edgeloop.checkpoint import read_hf_checkpoint
from edgeloop.presets import TINY
from edgeloop.recursion import RankChoice, build_recursive
from edgeloop.reference import ReferenceModel
from conftest import hf_logits

FAMILIES = list(TINY)
IDS = np.random.default_rng(0).integers(3, 300, size=20)


def _reference(path, **kw):
    ck = read_hf_checkpoint(path)
    rec, tensors = build_recursive(ck.spec, ck.globals, ck.layers, **{
        "loops": 1, "sharing": "cycle", "init": "average", "ranks": RankChoice(0), **kw})
    return ReferenceModel(ck.spec, rec, tensors)


@pytest.mark.parametrize("preset", FAMILIES)
def test_vanilla_reference_matches_transformers(hf_checkpoint, preset):
    path = hf_checkpoint(preset)
    expected = hf_logits(path, IDS)
    model = _reference(path)
    with torch.no_grad():
        full = model(torch.as_tensor(IDS)[None])[0].numpy()
        cache = model.new_cache()  # prefill 12 then 8 single-token decode steps
        parts = [model(torch.as_tensor(IDS[:12])[None], cache)[0]]
        parts += [model(torch.as_tensor(IDS[i:i + 1])[None], cache)[0] for i in range(12, len(IDS))]
    assert np.abs(full - expected).max() <= 1e-4
    assert np.abs(torch.cat(parts).numpy() - expected).max() <= 1e-4


@pytest.mark.parametrize("preset", FAMILIES)
def test_full_rank_cycle_reproduces_original_every_family(hf_checkpoint, preset):
    path = hf_checkpoint(preset)
    model = _reference(path, loops=2, sharing="cycle", init="average", ranks=RankChoice("full"))
    assert model.recursion.num_blocks == model.spec.num_layers // 2
    with torch.no_grad():
        got = model(torch.as_tensor(IDS)[None])[0].numpy()
    assert np.abs(got - hf_logits(path, IDS)).max() <= 1e-4


@pytest.mark.parametrize("sharing", ["cycle", "sequence", "middle-cycle"])
@pytest.mark.parametrize("init", ["stepwise", "average", "lower"])
def test_full_rank_reproduces_original_every_scheme(hf_checkpoint, sharing, init):
    path = hf_checkpoint("llama3")  # 6 layers: middle-cycle ties the middle 4 into 2 x 2
    model = _reference(path, loops=2, sharing=sharing, init=init, ranks=RankChoice("full"))
    with torch.no_grad():
        got = model(torch.as_tensor(IDS)[None])[0].numpy()
    assert np.abs(got - hf_logits(path, IDS)).max() <= 1e-4


def _kl(p_logits, q_logits):
    p = torch.log_softmax(torch.as_tensor(p_logits, dtype=torch.float64), -1)
    q = torch.log_softmax(torch.as_tensor(q_logits, dtype=torch.float64), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_share_norms_is_close_but_not_exact(hf_checkpoint, capsys):
    path = hf_checkpoint("llama")
    expected = hf_logits(path, IDS)
    for init in ("average", "stepwise"):
        model = _reference(path, loops=2, init=init, ranks=RankChoice("full"), share_norms=True)
        assert not model.recursion.per_depth_vectors
        with torch.no_grad():
            got = model(torch.as_tensor(IDS)[None])[0].numpy()
        kl = _kl(expected, got)
        print(f"share-norms full-rank {init}: KL to original {kl:.2e}")
        assert 0 < kl < 0.05  # tied norms cost something, full-rank LoRA keeps it small


def test_rank0_stepwise_equals_vanilla_with_selected_layers(hf_checkpoint):
    import transformers

    path = hf_checkpoint("llama3")  # 6 layers, K = 3 for B = 2: stepwise picks layers 0, 2 (2.5 -> 2), 5
    model = _reference(path, loops=2, sharing="cycle", init="stepwise", ranks=RankChoice(0))
    picks = list(model.recursion.source_layers)
    assert picks == [0, 2, 5]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    originals = [{k: v.clone() for k, v in layer.state_dict().items()} for layer in hf.model.layers]
    for l, layer in enumerate(hf.model.layers):
        layer.load_state_dict(originals[picks[l % 3]])
    with torch.no_grad():
        expected = hf(torch.as_tensor(IDS)[None]).logits[0].numpy()
        got = model(torch.as_tensor(IDS)[None])[0].numpy()
    assert np.abs(got - expected).max() <= 1e-4


def test_low_rank_lies_between_strict_and_exact(hf_checkpoint):
    path = hf_checkpoint("llama")
    expected = hf_logits(path, IDS)
    kls = []
    for rank in (0, 4, 16, "full"):
        model = _reference(path, loops=2, init="average", ranks=RankChoice(rank))
        with torch.no_grad():
            kls.append(_kl(expected, model(torch.as_tensor(IDS)[None])[0].numpy()))
    assert kls[0] > kls[1] > kls[2] > kls[3]
    assert kls[3] < 1e-8


def test_per_module_ranks(converted):
    from edgeloop.checkpoint import read_model_dir

    md = read_model_dir(converted("llama", loops=2, lora_rank=4, lora_rank_attn=2, lora_rank_mlp="full"))
    assert md.recursion.lora_ranks == {"q": 2, "k": 2, "v": 2, "o": 2, "gate": 64, "up": 64, "down": 64}
    assert md.tensors["blocks.0.lora.q.A"].shape == (2, 2, 64)  # [repeats, rank, in]
    assert md.tensors["blocks.0.lora.down.B"].shape == (2, 64, 64)  # [repeats, out, rank]


def test_saved_model_dir_round_trips(converted, hf_checkpoint):
    path = converted("qwen3", loops=2, lora_rank="full")
    m = edgeloop.load(path)
    assert np.abs(m.logits(IDS) - hf_logits(hf_checkpoint("qwen3"), IDS)).max() <= 1e-4


@pytest.mark.parametrize("preset", ["llama", "gemma", "gpt_neox"])
def test_export_merged_is_an_equivalent_hf_checkpoint(converted, tmp_path, preset):
    from edgeloop.export import export_merged

    model_dir = converted(preset, loops=2, lora_rank=8)
    out = export_merged(model_dir, tmp_path / "merged")
    expected = edgeloop.load(model_dir).logits(IDS)
    assert np.abs(hf_logits(out, IDS) - expected).max() <= 1e-4


def test_randomized_svd_is_near_optimal_and_deterministic():
    """--svd randomized finds the top-r subspace within 1% of the exact truncated SVD's error."""
    from edgeloop.recursion import svd_lora

    rng = np.random.default_rng(0)
    # a slowly decaying spectrum, the hard case for randomized SVD
    u = np.linalg.qr(rng.normal(size=(2, 1024, 256)))[0]
    v = np.linalg.qr(rng.normal(size=(2, 1536, 256)))[0]
    res = ((u * (1.0 / np.arange(1, 257) ** 0.5)) @ v.transpose(0, 2, 1)).astype(np.float32)

    def err(method):
        a, b = svd_lora(res, 32, method=method)
        return np.linalg.norm(res - b @ a, axis=(1, 2))

    exact, rand = err("exact"), err("randomized")
    assert np.all(rand >= exact * (1 - 1e-4)) and np.all(rand <= exact * 1.01), rand / exact
    assert np.array_equal(svd_lora(res, 32, method="auto")[0], svd_lora(res, 32, method="randomized")[0])
    assert np.array_equal(svd_lora(res[:, :256, :256], 32, method="auto")[0],
                          svd_lora(res[:, :256, :256], 32, method="exact")[0])  # small sides: exact
