"""Quantized artifacts: packing layout, parity with dequantized references, size and quality."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgeloop
from edgeloop.compiler import quant_pack as qp
from edgeloop.errors import EdgeloopError
from conftest import BUNDLED, run_cli, stepwise_logits

IDS = np.random.default_rng(1).integers(3, 300, size=24)
RNG = np.random.default_rng(0)


# ---------------------------------------------------------------------------------------------
# packing


@pytest.mark.parametrize("k,n,bits,block,symmetric", [(64, 48, 4, 32, False), (70, 33, 4, 32, False),
                                                      (100, 20, 4, 16, True), (90, 17, 8, 64, False)])
def test_block_round_trip_within_half_a_step(k, n, bits, block, symmetric):
    w = RNG.normal(size=(k, n)).astype(np.float32)
    p = qp.quantize_blocks(w, bits=bits, block_size=block, symmetric=symmetric)
    assert p.data.shape == (n, -(-k // block), block * bits // 8) and p.scales.shape == (n * p.n_blocks,)
    err = np.abs(qp.dequantize_blocks(p) - w) / qp.step_size(p)
    if symmetric:
        # The largest magnitude maps onto -2^(bits-1); only a value of the opposite sign as large
        # as it can clip at +2^(bits-1)-1, by at most one step.
        assert np.mean(err <= 0.5 + 1e-4) > 0.99 and err.max() <= 1 + 1e-4
    else:
        assert err.max() <= 0.5 + 1e-4


def test_channel_round_trip_within_half_a_step():
    w = RNG.normal(size=(96, 40)).astype(np.float32)
    p = qp.quantize_channels(w)
    assert (np.abs(qp.dequantize_channels(p) - w) / qp.step_size(p)).max() <= 0.5 + 1e-4


def test_scale_search_beats_round_to_nearest():
    for symmetric in (False, True):
        r = qp.compare_rtn(RNG.standard_t(4, size=(256, 64)).astype(np.float32), symmetric=symmetric)
        assert r["searched_rel_error"] < r["rtn_rel_error"]


@pytest.mark.parametrize("symmetric", [False, True])
def test_scale_search_in_parallel_tasks_is_exact(symmetric, monkeypatch):
    """The search runs in tasks of SEARCH_ROWS output columns on several threads: the packed weight is
    bit for bit the one a single task over every column gives."""
    monkeypatch.setattr(qp, "SEARCH_ROWS", 7)  # ragged last task
    w = RNG.standard_t(4, size=(96, 45)).astype(np.float32)
    parallel = qp.quantize_blocks(w, symmetric=symmetric, search=True, workers=4)
    monkeypatch.setattr(qp, "SEARCH_ROWS", 10_000)
    single = qp.quantize_blocks(w, symmetric=symmetric, search=True, workers=1)
    assert np.array_equal(parallel.data, single.data) and np.array_equal(parallel.scales, single.scales)
    assert (parallel.zero_points is None) == symmetric
    if not symmetric:
        assert np.array_equal(parallel.zero_points, single.zero_points)


def _one_node_session(node, inits, inputs, output):
    import onnxruntime as ort

    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("k,n,bits,block,symmetric,search", [(64, 48, 4, 32, False, False), (70, 33, 4, 32, False, True),
                                                             (100, 20, 4, 16, True, True), (256, 40, 8, 32, False, False)])
def test_matmulnbits_layout_matches_numpy(k, n, bits, block, symmetric, search):
    w = RNG.normal(size=(k, n)).astype(np.float32)
    p = qp.quantize_blocks(w, bits=bits, block_size=block, symmetric=symmetric, search=search)
    inits = {"B": p.data, "S": p.scales} | ({} if p.zero_points is None else {"Z": p.zero_points})
    node = helper.make_node("MatMulNBits", ["A", *inits], ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=0)
    session = _one_node_session(node, inits, [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])], "Y")
    x = RNG.normal(size=(5, k)).astype(np.float32)
    assert np.abs(session.run(None, {"A": x})[0] - x @ qp.dequantize_blocks(p)).max() <= 1e-4


# ---------------------------------------------------------------------------------------------
# artifacts vs the PyTorch reference on dequantized weights


def _dequantized_tensors(model_dir, *, quantize_embeddings, **q):
    """The model's tensors with every weight the int4 artifact quantizes replaced by what it decodes to.
    Fused groups quantize column by column, so quantizing each part alone gives the same values."""
    from edgeloop.checkpoint import read_model_dir

    md = read_model_dir(model_dir)
    tensors = dict(md.tensors)
    linears = set(md.spec.linear_shapes())
    for name, w in md.tensors.items():
        parts = name.split(".")
        if parts[0] == "blocks" and len(parts) == 4 and parts[2] in linears and parts[3] == "weight":
            tensors[name] = qp.dequantize_blocks(qp.quantize_blocks(w.T, **q)).T  # stored [out, in]
        elif quantize_embeddings and name in ("embed.weight", "lm_head.weight"):
            tensors[name] = qp.dequantize_blocks(qp.quantize_blocks(w.T, **q)).T  # [V, H], blocks along H
    return md, tensors


_stepwise = stepwise_logits


# qwen2: tied table decoded with plain ops from the head's codes; llama: untied, GatherBlockQuantized.
@pytest.mark.parametrize("preset,embeddings,lookup", [("qwen2", True, "BitShift"), ("llama", True, "GatherBlockQuantized"),
                                                      ("gpt_neox", False, "Gather")])
def test_int4_loop_and_unrolled_match_dequantized_reference(converted, tmp_path, preset, embeddings, lookup):
    from edgeloop.reference import ReferenceBackend, ReferenceModel
    from edgeloop.runtimes.model import Model

    model_dir = converted(preset, loops=2, lora_rank=8)
    md, tensors = _dequantized_tensors(model_dir, quantize_embeddings=embeddings, bits=4, block_size=32,
                                       symmetric=True, search=True)  # the compile defaults
    expected = Model(ReferenceBackend(ReferenceModel(md.spec, md.recursion, tensors)), model_dir, {}).logits(IDS)
    results = []
    for layout in ("loop", "unrolled"):
        out = tmp_path / layout
        manifest = edgeloop.compile(model_dir, out, layout=layout, quant="int4", quantize_embeddings=embeddings,
                                    accuracy_level=0)  # fp32 compute: no activation quantization
        ops = manifest.graph["ops"]
        assert ops.get("MatMulNBits", 0) >= 4 + embeddings and lookup in ops
        model = edgeloop.load(out)
        results.append(_stepwise(model, IDS))
        assert np.abs(model.logits(IDS) - expected).max() <= 1e-4
        assert np.abs(results[-1] - expected).max() <= 1e-4
    assert np.abs(results[0] - results[1]).max() <= 1e-4


def test_int8_lora_matches_dequantized_reference(converted, tmp_path):
    """--lora-dtype int8: each depth's A and B become 8-bit MatMulNBits; the artifact computes exactly the
    reference model with those factors decoded (fp32 compute), and the LoRA bytes shrink ~4x."""
    from edgeloop.checkpoint import read_model_dir
    from edgeloop.reference import ReferenceBackend, ReferenceModel
    from edgeloop.runtimes.model import Model

    model_dir = converted("llama", loops=2, lora_rank=8)
    md = read_model_dir(model_dir)
    tensors = dict(md.tensors)
    for name, w in md.tensors.items():  # A [R, r, in] is W [in, r] per depth; B [R, out, r] is W [r, out]
        if ".lora." in name:  # B's K is the rank (8): blocks of 16, the smallest MatMulNBits takes
            block = 16 if name.endswith(".B") else 32
            tensors[name] = np.stack([qp.dequantize_blocks(qp.quantize_blocks(d.T, bits=8, block_size=block,
                                                                              symmetric=True, search=True)).T
                                      for d in w])
    expected = Model(ReferenceBackend(ReferenceModel(md.spec, md.recursion, tensors)), model_dir, {}).logits(IDS)
    fp32 = edgeloop.compile(model_dir, tmp_path / "fp32", layout="unrolled")
    manifest = edgeloop.compile(model_dir, tmp_path / "int8", layout="unrolled", lora_dtype="int8", accuracy_level=0)
    assert manifest.quantization["schemes_by_kind"] == {"lora": "int8-block"}
    assert manifest.graph["ops"].get("MatMul", 0) < fp32.graph["ops"]["MatMul"]  # no float LoRA MatMul left
    assert manifest.graph["bytes_by_kind"]["lora"] <= 0.5 * fp32.graph["bytes_by_kind"]["lora"]
    model = edgeloop.load(tmp_path / "int8")
    assert np.abs(model.logits(IDS) - expected).max() <= 1e-4
    assert np.abs(_stepwise(model, IDS) - expected).max() <= 1e-4
    with pytest.raises(EdgeloopError, match="--layout unrolled"):
        edgeloop.compile(model_dir, tmp_path / "loop", layout="loop", lora_dtype="int8")
    assert not (tmp_path / "loop").exists()


def test_loop_body_reads_packed_outer_scope_weights(converted, tmp_path):
    manifest = edgeloop.compile(converted("llama", loops=4, lora_rank=8), tmp_path / "a", quant="int4", layout="loop")
    graph = onnx.load(str(tmp_path / "a" / "model.onnx"), load_external_data=False).graph
    body = next(a.g for n in graph.node if n.op_type == "Loop" for a in n.attribute if a.name == "body")
    nbits = [n for n in body.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 4 and not any(n.op_type == "MatMul" and n.input[1].endswith(".W") for n in body.node)
    names = {i.name for i in graph.initializer}
    assert all(n.input[1] in names for n in nbits) and "b0.qkv.W" not in names
    assert manifest.quantization["quantized_weights"] == ["b0.down.W", "b0.gate_up.W", "b0.o.W", "b0.qkv.W"]
    assert manifest.quality is not None and manifest.quality["text"] == "random token ids"


# ---------------------------------------------------------------------------------------------
# size

SIZE_PRESET = dict(model_type="llama", vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
                   bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def size_model(tmp_path_factory):
    from edgeloop.presets import make_hf_checkpoint

    root = tmp_path_factory.mktemp("size")
    edgeloop.convert(make_hf_checkpoint(SIZE_PRESET, root / "hf"), root / "model", loops=2, lora_rank=4)
    return root / "model"


def _artifact_bytes(contract, data_only: bool = False):
    ends = (".onnx.data",) if data_only else (".onnx", ".onnx.data")
    return sum(f.bytes for name, f in contract.files.items() if name.endswith(ends))


def test_sizes(size_model, tmp_path):
    fp32 = edgeloop.compile(size_model, tmp_path / "fp32")
    block = [f"b0.{g}.W" for g in ("qkv", "o", "gate_up", "down")]
    fp32_block = _init_bytes(tmp_path / "fp32", block)
    for symmetric, block_size, limit in ((True, 32, 0.16), (False, 64, 0.16)):  # default: symmetric, 32
        out = tmp_path / f"int4-{symmetric}-{block_size}"
        edgeloop.compile(size_model, out, quant="int4", symmetric=symmetric, block_size=block_size)
        packed = _init_bytes(out, [f"{b}.{s}" for b in block for s in ("q4", "qscales", "qzeros")])
        assert packed <= limit * fp32_block, (symmetric, block_size, packed / fp32_block)
    full = edgeloop.compile(size_model, tmp_path / "int4-emb", quant="int4", quantize_embeddings=True)
    # the weights shrink 5x; the graphs (six entry points, ~0.1 MB) are a fixed cost on this 7 MB model
    assert _artifact_bytes(full, data_only=True) <= 0.2 * _artifact_bytes(fp32, data_only=True)
    assert _artifact_bytes(full) <= 0.22 * _artifact_bytes(fp32)
    assert full.quality["size_vs_fp32"] <= 0.2 and "embed.weight" not in full.quantization["kept_float"]
    kept = edgeloop.compile(size_model, tmp_path / "kept", quant="int4", quantize_embeddings=True,
                            keep_float=["embed.*", "b0.down.W"])
    assert kept.quantization["kept_float"] == ["b0.down.W", "embed.weight"]
    assert "b0.down.W" not in kept.quantization["quantized_weights"]


def _init_bytes(artifact, names):
    graph = onnx.load(str(artifact / "model.onnx"), load_external_data=False).graph
    sizes = {i.name: int(np.prod(i.dims)) * onnx.helper.tensor_dtype_to_np_dtype(i.data_type).itemsize
             for i in graph.initializer}
    return sum(sizes.get(n, 0) for n in names)


# ---------------------------------------------------------------------------------------------
# quality on the bundled trained model


@pytest.fixture(scope="module")
def bundled_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("kjv") / "model"
    edgeloop.convert(BUNDLED, out, loops=4, lora_rank=32)
    return out


def test_bundled_quality(bundled_model, tmp_path):
    int8 = edgeloop.compile(bundled_model, tmp_path / "int8", quant="int8").quality
    assert int8["text"].endswith("heldout.txt") and int8["tokens"] >= 2000
    assert int8["mean_kl"] < 1e-4 and int8["top1_agreement"] > 0.99
    rtn = edgeloop.compile(bundled_model, tmp_path / "rtn", quant="int4", quantize_embeddings=True,
                           scale_search=False).quality
    searched = edgeloop.compile(bundled_model, tmp_path / "int4", quant="int4", quantize_embeddings=True).quality
    assert searched["mean_kl"] < 5e-3 and searched["top1_agreement"] > 0.93
    assert searched["mean_kl"] <= rtn["mean_kl"]
    assert abs(searched["perplexity_delta"]) < 0.05 * searched["perplexity_fp32"]


def test_cli_reports_quality(bundled_model, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text((BUNDLED / "heldout.txt").read_text(encoding="utf-8")[:3000], encoding="utf-8")
    r = run_cli("compile", bundled_model, "-o", tmp_path / "a", "--quant", "int8", "--calibration-text", text)
    assert r.returncode == 0, r.stderr
    assert "quality vs fp32" in r.stdout and "mean_kl" in r.stdout and "size_vs_fp32" in r.stdout
    r = run_cli("inspect", tmp_path / "a", "--json")
    assert r.returncode == 0 and '"top1_agreement"' in r.stdout and str(text) in r.stdout
    r = run_cli("compile", bundled_model, "-o", tmp_path / "b", "--quant", "int4", "--calibration-text",
                tmp_path / "missing.txt")
    assert r.returncode == 2 and "--calibration-text" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("preset", sorted(__import__("edgeloop.presets").presets.TINY))
def test_every_family_quantizes_runs_and_reports_quality(converted, tmp_path, preset):
    model_dir = converted(preset, loops=2, lora_rank=8)
    for quant in ("int8", "int4"):
        manifest = edgeloop.compile(model_dir, tmp_path / quant, quant=quant, quantize_embeddings=quant == "int4")
        quality = manifest.quality
        # random weights on random ids: only sanity here; the quality bars use the trained model
        assert 0 <= quality["mean_kl"] < 0.1 and 0.5 < quality["top1_agreement"] <= 1, quality
        model = edgeloop.load(tmp_path / quant)
        assert len(model.generate_tokens([5, 6, 7], max_new_tokens=4, ignore_eos=True)) == 4
