"""TVM CUDA artifacts, checked without a GPU: launch configuration, shipped device code, the GPU graph.

- Every matmul-like decode kernel of a hidden-256 model spreads over the GPU (read from the
  scheduled TIR into manifest.graph["kernels_launch"]); the check itself is tested on a one-block table.
- With nvcc, model.tar carries a fatbin whose cubins are for exactly the manifest's architectures;
  without it, CUDA source ships and the manifest says so.
- The GPU form of the graph (gate and up as separate blocks, padded prefill rows, the attention
  output reshaped) matches the PyTorch reference when compiled unscheduled for the CPU, so only
  the schedules themselves (semantics-preserving TVM primitives) are left unexecuted here.

- `--dtype float16` (and with int4) compiles for CUDA, and its graph matches the reference on CPU
  within float16 precision.

Compiles: the hidden-256 model for CUDA three times (fatbin, source, float16 int4), a vanilla tiny
model for CUDA and a tiny model twice for the CPU (float32, float16).
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

pytest.importorskip("tvm")

import edgeloop  # noqa: E402
from edgeloop.compiler import compile_model  # noqa: E402
from edgeloop.compiler import tvm_cuda  # noqa: E402
from edgeloop.compiler.tvm_gpu_check import blocks, underspread  # noqa: E402
from edgeloop.errors import EdgeloopError  # noqa: E402
from edgeloop.presets import TINY  # noqa: E402
from edgeloop.runtimes.backend import Row  # noqa: E402

H200_SMS = 132  # sm_90 (H100 / H200)
HIDDEN_256 = dict(TINY["llama"], hidden_size=256, intermediate_size=768, num_attention_heads=8,
                  num_key_value_heads=4)  # head_dim 32
DENSE_DECODE = ("qkv_decode", "o_decode", "gate_up_decode", "down_decode", "head_decode")


@pytest.fixture(scope="module")
def model256(tmp_path_factory):
    from edgeloop.presets import make_hf_checkpoint

    root = tmp_path_factory.mktemp("h256")
    make_hf_checkpoint(HIDDEN_256, root / "hf")
    edgeloop.convert(root / "hf", root / "model", loops=2, lora_rank=8)
    return root / "model"


@pytest.fixture(scope="module")
def cuda256(model256, tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda") / "a"
    return out, compile_model(model256, out, backend="tvm", target="cuda")


def test_decode_kernels_spread_over_the_gpu(cuda256):
    _, manifest = cuda256
    table, dense = manifest.graph["kernels_launch"], manifest.graph["dense_kernels"]
    assert set(DENSE_DECODE) <= set(table) and dense["gate_up_decode"]["single"]
    assert underspread(table, dense, H200_SMS) == []
    # the kernel that ran as one block of 256 threads (97.9% of decode) now covers every SM twice
    assert blocks(table["gate_up_decode"]) >= 2 * H200_SMS
    assert all(blocks(table[k]) >= H200_SMS for k in DENSE_DECODE)
    # prefill GEMMs tile both the tokens and the columns
    assert "s" in str(table["gate_up_prefill"]["grid"][1]) and table["gate_up_prefill"]["grid"][0] > 1


def test_underspread_flags_a_one_block_gemv():
    table = {"gate_up_decode": {"grid": [1, 1, 1], "block": [256, 1, 1]},
             "lora_a_decode": {"grid": [24, 1, 1], "block": [32, 1, 1]}}
    dense = {"gate_up_decode": {"columns": 768, "k": 256, "single": True},
             "lora_a_decode": {"columns": 24, "k": 256, "single": True}}
    problems = underspread(table, dense, H200_SMS)
    assert len(problems) == 1 and problems[0].startswith("gate_up_decode: 1 blocks")


def test_fatbin_ships_for_the_manifest_archs(cuda256):
    out, manifest = cuda256
    if tvm_cuda.find_nvcc() is None:
        pytest.skip("nvcc is not installed: the artifact ships CUDA source (see test_source_ships_without_nvcc)")
    cuda = manifest.tvm.cuda
    assert cuda.device_code == "fatbin" and cuda.archs == ("sm_80", "sm_90") and cuda.ptx == ("compute_90",)
    shipped = tvm_cuda.read_device_code(out / manifest.tvm.library)
    assert shipped["format"] == "fatbin"
    cubins = [e for e in shipped["entries"] if e["kind"] == "elf"]
    assert tuple(sorted(e["arch"] for e in cubins)) == cuda.archs
    assert all(e["elf_arch"] == e["arch"] for e in cubins)  # the cubins' own ELF headers agree
    cuobjdump = shutil.which("cuobjdump")
    if cuobjdump:  # the toolkit's own reading, where it is installed
        import tarfile

        with tarfile.open(out / "model.tar") as tar:
            tar.extract("devc.o", out / "x")
        listed = subprocess.run([cuobjdump, "--list-elf", str(out / "x" / "devc.o")], capture_output=True, text=True)
        assert all(a in listed.stdout for a in cuda.archs), listed.stdout + listed.stderr


def test_source_ships_without_nvcc(model256, tmp_path, monkeypatch):
    monkeypatch.setattr(tvm_cuda, "find_nvcc", lambda: None)
    manifest = compile_model(model256, tmp_path / "a", backend="tvm", target="cuda", arch=["sm_86"])
    assert manifest.tvm.cuda.device_code == "source" and manifest.tvm.cuda.archs == ("sm_86",)
    assert "NVRTC" in manifest.tvm.cuda.note
    assert tvm_cuda.read_device_code(tmp_path / "a" / "model.tar") == {"format": "cuda"}
    with pytest.raises(EdgeloopError, match="no CUDA device"):
        edgeloop.load(tmp_path / "a")


@pytest.mark.parametrize("options,match", [(dict(target="cpu", arch=["sm_90"]), "--arch"),
                                           (dict(target="cuda", arch=["sm_91"]), "unknown --arch")])
def test_arch_option_is_checked(options, match, converted, tmp_path):
    with pytest.raises(EdgeloopError, match=match):
        compile_model(converted("llama", loops=2, lora_rank=8), tmp_path / "a", backend="tvm", **options)


def test_arch_flag_parsing():
    from edgeloop.compiler.tvm_targets import cuda_archs

    assert cuda_archs(["sm_90,sm_80", "sm_90"]) == ("sm_80", "sm_90")
    assert cuda_archs([]) == ("sm_80", "sm_90")
    assert tvm_cuda.gencode_flags(("sm_80", "sm_90"))[-1] == "arch=compute_90,code=compute_90"


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("float16", 3e-2)])
def test_gpu_graph_matches_reference_on_cpu(dtype, tol, converted, tmp_path, monkeypatch):
    """The GPU kernels' TE (split gate/up, rows padded to the GEMM tile, 2-D attention output; float16
    storage with float32 sums) built without GPU schedules for the host CPU, against the reference."""
    from edgeloop.compiler import tvm_targets

    cpu = tvm_targets.plan("cpu")
    gpu_graph_on_cpu = tvm_targets.TargetPlan("cpu", cpu.target, cpu.library, cpu=False, device="cpu")
    monkeypatch.setattr(tvm_targets, "plan", lambda name, archs=None: gpu_graph_on_cpu)
    model_dir = converted("llama", loops=2, lora_rank=8)
    manifest = compile_model(model_dir, tmp_path / "a", backend="tvm", target="cuda", dtype=dtype)
    assert manifest.graph["tile"] == 1 and manifest.kv.dtype == dtype  # the GPU layout
    ref, art = edgeloop.load(model_dir), edgeloop.load(tmp_path / "a")
    ids = np.random.default_rng(0).integers(3, ref.backend.vocab_size, 40)  # 40: two 32-row tiles, one partial
    logits, expected = art.logits(ids), ref.logits(ids)
    np.testing.assert_allclose(logits, expected, atol=tol, rtol=0)
    assert (logits.argmax(-1) == expected.argmax(-1)).all()
    rs, ts = ref.backend.new_state(), art.backend.new_state()
    for tok in ids[:3]:
        one = np.array([tok])
        np.testing.assert_allclose(art.backend.step([Row(ts, one)])[0].logits, ref.backend.step([Row(rs, one)])[0].logits,
                                   atol=tol, rtol=0)


def test_float16_int4_compiles_for_cuda(model256, tmp_path):
    """--dtype float16 with int4 weights: float16 activations, LoRA and KV cache, float32 sums; the CUDA
    source compiles with nvcc (sm_80) when it is installed."""
    import tvm

    manifest = compile_model(model256, tmp_path / "a", backend="tvm", target="cuda", dtype="float16", quant="int4",
                             arch=["sm_80"])
    assert manifest.kv.dtype == "float16" and "float16 activations" in manifest.quantization["compute"]
    assert underspread(manifest.graph["kernels_launch"], manifest.graph["dense_kernels"], H200_SMS) == []
    params = tvm.runtime.load_param_dict_from_file(str(tmp_path / "a" / "params.bin"))
    assert params["blocks.0.qkv.Wq"].dtype == "uint8" and params["blocks.0.qkv.Ws"].dtype == "float16"
    assert params["blocks.0.qkv.A"].dtype == "float16" and params["rope.cos"].dtype == "float32"
    assert "half" in (tmp_path / "a" / "model.cu").read_text()
    if tvm_cuda.find_nvcc():
        assert manifest.tvm.cuda.device_code == "fatbin" and manifest.tvm.cuda.archs == ("sm_80",)


def test_float16_is_for_tvm_cuda(converted, tmp_path):
    with pytest.raises(EdgeloopError, match="float16"):
        compile_model(converted("llama", loops=2, lora_rank=8), tmp_path / "a", backend="tvm", dtype="float16")


def test_vanilla_checkpoint_compiles_for_cuda(hf_checkpoint, tmp_path, monkeypatch):
    """B = 1 without LoRA: dlight's GEMV rule used to assert on its dense kernels (is_broadcast_epilogue)."""
    monkeypatch.setattr(tvm_cuda, "find_nvcc", lambda: None)  # the schedules are what is tested here
    manifest = compile_model(hf_checkpoint("llama"), tmp_path / "a", backend="tvm", target="cuda")
    assert underspread(manifest.graph["kernels_launch"], manifest.graph["dense_kernels"], H200_SMS) == []
