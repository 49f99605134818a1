"""ONNX Runtime artifacts against the PyTorch reference, per family and layout."""

import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest

import edgeloop
from edgeloop.presets import TINY
from conftest import hf_logits, run_cli, stepwise_logits

IDS = np.random.default_rng(1).integers(3, 300, size=24)
PREFILL = 8


@pytest.fixture(scope="session")
def artifact(tmp_path_factory, converted):
    """artifact(preset, layout, target="cpu", **convert_options) -> compiled artifact dir (cached)."""
    cache = {}
    root = tmp_path_factory.mktemp("artifacts")

    def make(preset, layout="loop", target="cpu", **options):
        options = options or {"loops": 2, "lora_rank": 8}
        key = (preset, layout, target, tuple(sorted(options.items())))
        if key not in cache:
            out = root / f"{preset}-{layout}-{target}-{len(cache)}"
            edgeloop.compile(converted(preset, **options), out, layout=layout, target=target)
            cache[key] = out
        return cache[key]

    return make


def _stepwise_logits(model, ids):
    return stepwise_logits(model, ids, PREFILL)


@pytest.mark.parametrize("layout", ["loop", "unrolled"])
@pytest.mark.parametrize("preset", list(TINY))
def test_artifact_matches_reference(artifact, converted, preset, layout):
    reference = edgeloop.load(converted(preset, loops=2, lora_rank=8))
    model = edgeloop.load(artifact(preset, layout))
    expected = reference.logits(IDS)
    assert np.abs(model.logits(IDS) - expected).max() <= 1e-4
    assert np.abs(_stepwise_logits(model, IDS) - expected).max() <= 1e-4
    prompt = list(IDS[:6])
    assert model.generate_tokens(prompt, max_new_tokens=32) == reference.generate_tokens(prompt, max_new_tokens=32)


@pytest.mark.parametrize("preset", list(TINY))
def test_full_rank_artifact_matches_transformers(artifact, hf_checkpoint, preset):
    model = edgeloop.load(artifact(preset, "loop", loops=2, lora_rank="full"))
    assert np.abs(model.logits(IDS) - hf_logits(hf_checkpoint(preset), IDS)).max() <= 1e-4


@pytest.mark.parametrize("sharing", ["sequence", "middle-cycle"])
def test_other_sharing_schemes_compile(artifact, converted, sharing):
    options = {"loops": 2, "lora_rank": 4, "sharing": sharing}
    reference = edgeloop.load(converted("llama3", **options))
    for layout in ("loop", "unrolled"):
        model = edgeloop.load(artifact("llama3", layout, **options))
        assert np.abs(_stepwise_logits(model, IDS) - reference.logits(IDS)).max() <= 1e-4
    graph = onnx.load(str(artifact("llama3", "loop", **options) / "model.onnx"), load_external_data=False).graph
    loops = sum(n.op_type == "Loop" for n in graph.node)
    assert loops == (3 if sharing == "sequence" else 1)  # sequence: one Loop per shared layer (6 / 2)


def _initializer_uses(graph):
    uses = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    return uses


def test_loop_graph_holds_the_block_once(artifact):
    path = artifact("llama", "loop", loops=4, lora_rank=8)  # 4 layers -> K = 1, B = 4
    graph = onnx.load(str(path / "model.onnx"), load_external_data=False).graph
    loops = [n for n in graph.node if n.op_type == "Loop"]
    assert len(loops) == 1
    body = next(a.g for a in loops[0].attribute if a.name == "body")
    shared = [i.name for i in graph.initializer if i.name.startswith("b0.") and i.name.endswith(".W")]
    assert sorted(shared) == ["b0.down.W", "b0.gate_up.W", "b0.o.W", "b0.qkv.W"]
    main_uses, body_uses = _initializer_uses(graph), _initializer_uses(body)
    for name in shared:
        assert main_uses.get(name, 0) == 0, f"{name} used in the main graph"
        assert body_uses.get(name, 0) == 1, f"{name} used {body_uses.get(name, 0)} times in the body"
    assert edgeloop.load(path).contract.graph["loops"] == 1


def test_sizes_loop_unrolled_vanilla(artifact, hf_checkpoint, tmp_path):
    loop = edgeloop.load(artifact("llama", "loop", loops=4, lora_rank=4)).contract
    unrolled = edgeloop.load(artifact("llama", "unrolled", loops=4, lora_rank=4)).contract
    vanilla = edgeloop.compile(hf_checkpoint("llama"), tmp_path / "vanilla", layout="unrolled")

    def size(manifest):
        return sum(f.bytes for name, f in manifest.files.items() if name.endswith((".onnx", ".onnx.data")))

    def weights(manifest):  # the unrolled graph's RoPE tables are half width (GroupQueryAttention rotates)
        return sum(v for k, v in manifest.graph["bytes_by_kind"].items() if k != "other")

    assert abs(weights(loop) - weights(unrolled)) / weights(unrolled) < 0.01
    assert abs(size(loop) - size(unrolled)) / size(unrolled) < 0.1
    assert size(loop) < 0.6 * size(vanilla)


def test_mobile_ort_format_loads_and_matches(artifact, converted):
    path = artifact("qwen2", "loop", target="mobile")
    assert (path / "model.ort").is_file() and (path / "required_operators.config").is_file()
    reference = edgeloop.load(converted("qwen2", loops=2, lora_rank=8))
    model = edgeloop.load(path, use_ort_format=True)
    assert model.backend.session._model_path.endswith("model.ort")
    assert np.abs(_stepwise_logits(model, IDS) - reference.logits(IDS)).max() <= 1e-4


def test_cuda_target_builds_a_valid_fp16_graph(artifact):
    path = artifact("gemma", "loop", target="cuda")
    proto = onnx.load(str(path / "model.onnx"))
    onnx.checker.check_model(proto)
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    r = run_cli("run", path, "--prompt", "hi")
    assert r.returncode == 2 and "CUDAExecutionProvider" in r.stderr


def test_runs_without_torch(artifact):
    path = artifact("llama", "loop")
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('torch', 'onnx', 'tvm', 'transformers'):
                    raise ImportError('blocked: ' + name)
        sys.meta_path.insert(0, Block())
        import edgeloop
        m = edgeloop.load({str(path)!r})
        print(m.logits([5, 6, 7]).shape, len(m.generate('ab', max_new_tokens=4)) >= 0)
        assert not any(k.split('.')[0] in ('torch', 'onnx', 'tvm') for k in sys.modules)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "(3, 320) True" in r.stdout


def test_modified_artifact_is_rejected(artifact, tmp_path):
    import shutil

    path = shutil.copytree(artifact("llama", "loop"), tmp_path / "a")
    data = path / "weights.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    r = run_cli("run", path, "--prompt", "hi")
    assert r.returncode == 2 and "checksum mismatch" in r.stderr and "Traceback" not in r.stderr


def test_compile_errors_are_clean(tmp_path, converted):
    r = run_cli("compile", tmp_path / "missing", "-o", tmp_path / "out")
    assert r.returncode == 2 and "not found" in r.stderr
    r = run_cli("compile", converted("llama", loops=2, lora_rank=8), "-o", tmp_path / "out", "--target", "ios")
    assert r.returncode == 2 and "--target ios" in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("preset", ["llama", "gemma", "gpt_neox"])
def test_vanilla_checkpoint_compiles_directly(hf_checkpoint, tmp_path, preset):
    """A HF checkpoint compiles as K = L, B = 1 and matches transformers."""
    expected = hf_logits(hf_checkpoint(preset), IDS)
    for layout in ("loop", "unrolled"):
        out = tmp_path / layout
        edgeloop.compile(hf_checkpoint(preset), out, layout=layout)
        model = edgeloop.load(out)
        assert np.abs(_stepwise_logits(model, IDS) - expected).max() <= 1e-4


@pytest.mark.parametrize("layout", ["loop", "unrolled"])
def test_float16_lora_storage_is_kept(converted, tmp_path, layout):
    model_dir = converted("llama", loops=2, lora_rank=8)
    sizes, logits = {}, {}
    for dtype in ("float32", "float16"):
        out = tmp_path / dtype
        manifest = edgeloop.compile(model_dir, out, layout=layout, lora_dtype=dtype)
        sizes[dtype] = manifest.files["weights.onnx.data"].bytes
        logits[dtype] = edgeloop.load(out).logits(IDS)
        lora_bytes = manifest.graph["bytes_by_kind"]["lora"]
    # the LoRA halves on disk (offline optimization must not fold the Casts back to fp32)
    assert sizes["float32"] - sizes["float16"] >= 0.9 * lora_bytes
    assert np.abs(logits["float32"] - logits["float16"]).max() < 1e-2


def test_compile_finishes_each_graph_before_building_the_next(converted, tmp_path, monkeypatch):
    """The forward graph, both block steps and kv_fill each carry the shared weights: the compiler
    quantizes and saves one graph, and lets go of its weights, before it builds the next (holding them
    all took ~10x the model's size in memory). No temporary file is left in the artifact."""
    from edgeloop.compiler import onnx_build, onnx_pipeline

    built, staging = [], {}
    original = onnx_build.build_graphs

    def watched(*args, **kwargs):
        for graph in original(*args, **kwargs):
            if built:  # every graph built so far is on disk and its builder holds no weights
                for g in built:
                    assert (staging["dir"] / g.file).is_file(), g.name
                    assert not g.builder.root.initializers, g.name
            built.append(graph)
            yield graph

    real_save = onnx_pipeline.save

    def save(prog, unit, model, options, out_dir):
        staging["dir"] = out_dir
        return real_save(prog, unit, model, options, out_dir)

    monkeypatch.setattr(onnx_pipeline, "build_graphs", watched)
    monkeypatch.setattr(onnx_pipeline, "save", save)
    monkeypatch.setattr(onnx_pipeline, "GRAPH_PASSES", [(n, save if n == "save" else f)
                                                        for n, f in onnx_pipeline.GRAPH_PASSES])
    out = tmp_path / "a"
    edgeloop.compile(converted("llama", loops=2, lora_rank=4), out, quant="int4")
    assert [g.name for g in built] == ["forward", "prologue", "block", "block_dense", "kv_fill", "epilogue"]
    assert all(p.is_file() for p in out.iterdir())  # the float graph kept for the quality check is gone
    contract = edgeloop.load(out).backend.contract
    assert contract.quality is not None and 0 < contract.quality["size_vs_fp32"] < 1 and contract.quality["tokens"] > 0
