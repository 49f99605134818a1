"""TVM backend: every family's recursive model compiled for CPU matches the PyTorch reference,
and the int4 artifact matches the reference running the same dequantized weights.

Artifacts are compiled once per session (about 8-12 s each on 2 cores) and shared by the tests.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

import edgeloop  # noqa: E402
from edgeloop.compiler import compile_model  # noqa: E402
from edgeloop.errors import EdgeloopError  # noqa: E402
from edgeloop.presets import TINY  # noqa: E402
from edgeloop.runtimes.backend import Row  # noqa: E402

FAMILIES = sorted(TINY)
PROMPT, DECODE_STEPS, TOL = 12, 8, 1e-4
CROSS_TARGETS = ("cuda", "android-cpu", "android-opencl", "ios-cpu", "ios-metal", "webgpu")


@pytest.fixture(scope="session")
def tvm_compiled(tmp_path_factory):
    """tvm_compiled(model_dir, target="cpu") -> artifact dir (compiled once per session)."""
    cache: dict[tuple, object] = {}
    root = tmp_path_factory.mktemp("tvm")

    def make(model_dir, target: str = "cpu", **options):
        key = (str(model_dir), target, tuple(sorted(options.items())))
        if key not in cache:
            out = root / f"a{len(cache)}-{target}"
            compile_model(model_dir, out, backend="tvm", target=target, **options)
            cache[key] = out
        return cache[key]

    return make


def _ids(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, n)


def _assert_parity(model_dir, artifact, ref=None):
    ref, art = ref or edgeloop.load(model_dir), edgeloop.load(artifact)
    ids = _ids(PROMPT + DECODE_STEPS, ref.backend.vocab_size)
    # prefill: every position's logits
    np.testing.assert_allclose(art.logits(ids[:PROMPT]), ref.logits(ids[:PROMPT]), atol=TOL, rtol=0)
    # prefill then one decode step at a time over the same KV state
    rs, ts = ref.backend.new_state(), art.backend.new_state()

    def step(model, state, tokens):
        return model.backend.step([Row(state, np.asarray(tokens))])[0].logits

    np.testing.assert_allclose(step(art, ts, ids[:PROMPT]), step(ref, rs, ids[:PROMPT]), atol=TOL, rtol=0)
    for tok in ids[PROMPT:]:
        one = np.array([tok])
        np.testing.assert_allclose(step(art, ts, one), step(ref, rs, one), atol=TOL, rtol=0)
    assert ts.length == PROMPT + DECODE_STEPS
    prompt = [int(i) for i in ids[:6]]
    opts = dict(max_new_tokens=10, temperature=0.0, ignore_eos=True)
    assert art.generate_tokens(prompt, **opts) == ref.generate_tokens(prompt, **opts)


@pytest.mark.parametrize("preset", FAMILIES)
def test_family_matches_reference(preset, converted, tvm_compiled):
    model_dir = converted(preset, loops=2, lora_rank=8)
    artifact = tvm_compiled(model_dir)
    contract = edgeloop.load(artifact).contract
    assert contract.layout == "recursion" and contract.graph["stages"][0]["repeats"] == 2
    _assert_parity(model_dir, artifact)


@pytest.mark.parametrize("sharing", ["sequence", "middle-cycle"])
def test_multi_stage_sharing(sharing, converted, tvm_compiled):
    model_dir = converted("llama3", loops=2, sharing=sharing, lora_rank=4)  # 6 layers
    artifact = tvm_compiled(model_dir)
    stages = edgeloop.load(artifact).contract.graph["stages"]
    assert len(stages) == 3 and any(s["repeats"] == 2 for s in stages)
    _assert_parity(model_dir, artifact)


def test_vanilla_checkpoint(hf_checkpoint, tvm_compiled):
    """A HF dir compiles as K = L, B = 1 (one stage that runs once)."""
    _assert_parity(hf_checkpoint("qwen2"), tvm_compiled(hf_checkpoint("qwen2")))


def test_rewind_and_chunked_prefill(converted, tvm_compiled):
    model_dir = converted("llama", loops=2, lora_rank=8)
    art = edgeloop.load(tvm_compiled(model_dir))
    ids = _ids(20, art.backend.vocab_size, seed=3)
    state = art.backend.new_state()
    art.backend.step([Row(state, ids)])
    art.backend.rewind(state, 10)
    assert state.length == 10
    again = art.backend.step([Row(state, ids[10:15], all_logits=True)])[0].logits
    np.testing.assert_allclose(again, art.logits(ids[:15])[10:], atol=1e-5, rtol=0)
    art.backend._chunk = 7  # prompts longer than a prefill chunk go in several calls
    np.testing.assert_allclose(art.logits(ids), edgeloop.load(model_dir).logits(ids), atol=TOL, rtol=0)


def test_context_limit(converted, tvm_compiled):
    art = edgeloop.load(tvm_compiled(converted("llama", loops=2, lora_rank=8)))
    state = art.backend.new_state()
    with pytest.raises(EdgeloopError, match="context"):
        art.backend.step([Row(state, np.zeros(art.backend.max_context + 1, dtype=np.int64))])


def _dequantized_reference(model_dir, **q):
    """The PyTorch reference running exactly the weights the int4 artifact decodes: every shared
    block linear through quant_pack's packing and back (fused groups quantize column by column,
    so quantizing each member alone gives the same values)."""
    from edgeloop.checkpoint import read_model_dir
    from edgeloop.compiler import quant_pack as qp
    from edgeloop.reference import ReferenceBackend, ReferenceModel
    from edgeloop.runtimes.model import Model

    md = read_model_dir(model_dir)
    tensors, linears = dict(md.tensors), set(md.spec.linear_shapes())
    for name, w in md.tensors.items():
        parts = name.split(".")
        if parts[0] == "blocks" and len(parts) == 4 and parts[2] in linears and parts[3] == "weight":
            tensors[name] = qp.dequantize_blocks(qp.quantize_blocks(w.T, bits=4, **q)).T  # stored [out, in]
    return Model(ReferenceBackend(ReferenceModel(md.spec, md.recursion, tensors)), model_dir, {})


# llama: the compile defaults (symmetric, scale search); qwen2: biases, asymmetric zero points, 16-blocks
@pytest.mark.parametrize("preset,q", [("llama", dict(block_size=32, symmetric=True, search=True)),
                                      ("qwen2", dict(block_size=16, symmetric=False, search=False))])
def test_int4_matches_dequantized_reference(preset, q, converted, tvm_compiled):
    model_dir = converted(preset, loops=2, lora_rank=8)
    artifact = tvm_compiled(model_dir, quant="int4", block_size=q["block_size"], symmetric=q["symmetric"],
                            scale_search=q["search"])
    contract = edgeloop.load(artifact).contract
    quant = contract.quantization
    assert quant["block_size"] == q["block_size"] and quant["symmetric"] == q["symmetric"]
    assert {w.split(".")[-1] for w in quant["quantized_weights"]} == {"down", "gate_up", "o", "qkv"}
    names = contract.tvm.param_names
    assert "blocks.0.qkv.Wq" in names and "blocks.0.qkv.W" not in names  # no fp32 copy of a packed weight
    assert ("blocks.0.qkv.Wz" in names) != q["symmetric"] and "blocks.0.qkv.A" in names  # LoRA stays float
    # one fused decode-inside-matmul kernel per group and mode, no separate decode kernel
    assert {"qkv_int4_decode", "down_int4_prefill"} <= set(contract.kernels)
    _assert_parity(model_dir, artifact, ref=_dequantized_reference(model_dir, **q))


# cross targets: int4 on the CPU-schedule path and two GPU paths, fp32 on the others
@pytest.mark.parametrize("target,quant", [("cuda", "int4"), ("android-cpu", "int4"), ("ios-cpu", "int4"),
                                          ("ios-metal", "int4"), ("android-opencl", "none"), ("webgpu", "none")])
def test_cross_target_compiles(target, quant, converted, tvm_compiled):
    assert {target} <= set(CROSS_TARGETS)
    artifact = tvm_compiled(converted("llama", loops=2, lora_rank=8), target, quant=quant)
    assert (artifact / "model.tar").stat().st_size > 0 and (artifact / "params.bin").is_file()
    with pytest.raises(EdgeloopError, match="--target cpu"):
        edgeloop.load(artifact)


@pytest.mark.parametrize("option", [dict(quant="int8"), dict(quant="int4", quantize_embeddings=True),
                                    dict(layout="unrolled"), dict(tune_trials=4)])
def test_unsupported_options_fail_clearly(option, converted, tmp_path):
    with pytest.raises(EdgeloopError):
        compile_model(converted("llama", loops=2, lora_rank=8), tmp_path / "out", backend="tvm", **option)


def test_cuda_source_compiles_with_nvcc(tmp_path, converted):
    """No GPU here: the generated CUDA source is at least checked by nvcc for sm_90."""
    import shutil
    import subprocess

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed; the CUDA artifact is built but its source is not compiled")
    contract = edgeloop.compile(converted("llama", loops=2, lora_rank=8), tmp_path / "cu", backend="tvm",
                                target="cuda", arch=["sm_90"])
    assert contract.tvm.device_sources == ("model.cu",)
    r = subprocess.run([nvcc, "-c", str(tmp_path / "cu" / "model.cu"), "-arch=sm_90", "-o", str(tmp_path / "m.o")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
