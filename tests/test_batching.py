"""Batched steps and the host-driven block step, on every backend, against the reference and one-by-one runs."""

from __future__ import annotations

import numpy as np
import pytest

import edgeloop
from edgeloop.presets import TINY
from edgeloop.runtimes.backend import BlockRow, Row

TOL = 1e-4
BACKENDS = ["ort-unrolled", "ort-loop", "tvm"]


@pytest.fixture(scope="session")
def compiled(converted, tmp_path_factory):
    """compiled(preset, backend) -> a loaded artifact of the preset (loops 2, rank 4), cached."""
    cache = {}
    root = tmp_path_factory.mktemp("batching")

    def make(preset: str, backend: str, **convert):
        key = (preset, backend, tuple(sorted(convert.items())))
        if key not in cache:
            md = converted(preset, **(convert or dict(loops=2, lora_rank=4)))
            out = root / f"{preset}-{backend}-{len(cache)}"
            if backend == "tvm":
                pytest.importorskip("tvm")
                edgeloop.compile(md, out, backend="tvm")
            else:
                edgeloop.compile(md, out, layout=backend.split("-")[1])
            cache[key] = edgeloop.load(out)
        return cache[key]

    return make


def _prompts(n: int, vocab: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=int(length)) for length in rng.integers(1, 14, size=n)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ragged_batch_equals_one_by_one(compiled, backend):
    """Prompts of different lengths prefill in one call; decode steps mix rows that joined late, sat out a
    step or already left; every row's logits equal its run alone."""
    model = compiled("llama", backend)
    b = model.backend
    prompts = _prompts(5, b.vocab_size)
    follow = [7, 8, 9]
    alone = []
    for p in prompts:
        s = b.new_state()
        alone.append([b.step([Row(s, p, all_logits=True)])[0].logits]
                     + [b.step([Row(s, np.array([t]))])[0].logits for t in follow])
        b.release(s)
    # call k feeds the rows listed for it their next input (the prompt first); row 4 joins late,
    # row 2 sits out two calls, row 0 leaves after its prompt and one token
    schedule = [[0, 1, 2, 3], [0, 1, 2, 3, 4], [1, 3, 4], [1, 3, 4], [2, 4], [2]]
    states = [b.new_state() for _ in prompts]
    fed = [0] * len(prompts)
    got = [[] for _ in prompts]
    for rows in schedule:
        inputs = [prompts[i] if fed[i] == 0 else np.array([follow[fed[i] - 1]]) for i in rows]
        outs = b.step([Row(states[i], x, all_logits=fed[i] == 0) for i, x in zip(rows, inputs)])
        for i, o in zip(rows, outs):
            got[i].append(o.logits)
            fed[i] += 1
    for i in range(len(prompts)):
        assert len(got[i]) >= 2
        for e, g in zip(alone[i], got[i]):
            assert np.abs(e - g).max() <= TOL, (backend, i)
    for s in states:
        b.release(s)


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_list_runs_as_one_batch(compiled, backend):
    model = compiled("llama", backend)
    prompts = ["one", "two two", "three three three", "a", "the longest prompt of them all"]
    options = dict(max_new_tokens=10, ignore_eos=True)
    calls = []
    original = model.backend.step
    model.backend.step = lambda rows: calls.append(len(rows)) or original(rows)
    try:
        batch = model.generate(prompts, **options)
    finally:
        model.backend.step = original
    assert max(calls) == len(prompts) and len(calls) <= 10 + 2  # rows step together, not one prompt at a time
    assert batch == [model.generate(p, **options) for p in prompts]
    seeded = dict(options, temperature=0.8, seed=7)
    assert model.generate(prompts, **seeded) == [model.generate(p, **seeded) for p in prompts]


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("preset", sorted(TINY))
def test_block_step_at_every_depth(compiled, converted, preset, backend):
    """Rows at different depths in one block call equal the reference at each depth (every pass probed
    through the head), and the host loop at full depth equals the fused graph."""
    if preset == "gpt_neox_seq" and backend != "reference":
        pytest.skip("covered by gpt_neox (same graph code, sequential residual)")
    md = converted(preset, loops=2, lora_rank=4)
    ref = edgeloop.load(md)
    model = ref if backend == "reference" else compiled(preset, backend)
    prompts = _prompts(3, model.backend.vocab_size, seed=1)
    tokens = [[int(t) for t in p[:1]] * 3 for p in prompts]  # three decode tokens per row
    got = _staggered(model.backend, prompts, tokens)
    expected = _staggered(ref.backend, prompts, tokens)
    assert got.keys() == expected.keys()
    for key in expected:
        assert np.abs(got[key] - expected[key]).max() <= TOL, (backend, key)
    # every position is complete here: the dense block (GroupQueryAttention, no validity mask) agrees
    dense = _staggered(model.backend, prompts, tokens, complete=True)
    if backend == "ort-unrolled" and model.backend.contract.model.head_dim % 8 == 0:
        assert "block_dense" in model.backend.contract.entry_points
    for key in expected:
        assert np.abs(dense[key] - expected[key]).max() <= TOL, (backend, key, "dense")
    # full depth on the host equals the fused graph on the same tokens
    fused = model.logits(np.concatenate([prompts[2], tokens[2]]))
    assert np.abs(got[(2, 2, model.backend.loops - 1)] - fused[-1]).max() <= TOL


@pytest.mark.parametrize("complete", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_block_call_mixes_a_prompt_with_decode_rows(compiled, converted, backend, complete):
    """A prompt (several tokens, no past) and decode rows (one token, a past) in one block call — what
    the sequence-level scheduler does when a request joins — equal the reference, with the dense block
    (whose attention op refuses several tokens after a past in a batch) and without."""
    model, ref = compiled("llama", backend), edgeloop.load(converted("llama", loops=2, lora_rank=4))

    def run(backend_):
        prompts = _prompts(3, backend_.vocab_size, seed=3)
        states = [backend_.new_state(host=True) for _ in prompts]
        h = backend_.embed([Row(s, p) for s, p in zip(states[:2], prompts[:2])])  # rows 0, 1 decode later
        for r in range(backend_.loops):
            h = backend_.block([BlockRow(s, x, r) for s, x in zip(states[:2], h)], complete=complete)
        for s, p in zip(states, prompts[:2]):
            backend_.advance(s, len(p))
        mixed = [Row(states[0], np.array([5])), Row(states[1], np.array([6])), Row(states[2], prompts[2])]
        h = backend_.embed(mixed)
        for r in range(backend_.loops):
            h = backend_.block([BlockRow(row.state, x, r) for row, x in zip(mixed, h)], complete=complete)
        logits = [o.logits for o in backend_.head(h)]
        for s in states:
            backend_.release(s)
        return logits

    for got, expected in zip(run(model.backend), run(ref.backend)):
        assert got.shape == expected.shape and np.abs(got - expected).max() <= TOL, backend


def _staggered(backend, prompts, tokens, complete: bool = False) -> dict:
    """Prefill every row at full depth together; then decode with the rows a pass apart, so every block
    call mixes depths (row i starts its token's passes i calls after row 0). Returns the head's logits
    of every (row, token, depth)."""
    loops = backend.loops
    states = [backend.new_state(host=True) for _ in prompts]
    h = backend.embed([Row(s, p) for s, p in zip(states, prompts)])
    for r in range(loops):
        h = backend.block([BlockRow(s, x, r) for s, x in zip(states, h)], complete=complete)
    for s, p in zip(states, prompts):
        backend.advance(s, len(p))
    probes = {}
    n_tok = len(tokens[0])
    work = {i: [(t, r) for t in range(n_tok) for r in range(loops)] for i in range(len(prompts))}
    hidden = {i: None for i in work}
    call = 0
    while any(work.values()):
        rows = []
        for i in work:  # row i is i calls behind row 0
            if work[i] and call >= i:
                rows.append(i)
        batch = []
        for i in rows:
            t, r = work[i][0]
            if r == 0:
                hidden[i] = backend.embed([Row(states[i], np.array([tokens[i][t]]))])[0]
            batch.append(BlockRow(states[i], hidden[i], r))
        if batch:
            assert len(rows) < 2 or len({b.depth for b in batch}) > 1 or loops == 1
            outs = backend.block(batch, complete=complete)
            heads = backend.head(outs)
            for i, x, o in zip(rows, outs, heads):
                t, r = work[i].pop(0)
                hidden[i] = x
                probes[(i, t, r)] = o.logits
                if r == loops - 1:
                    backend.advance(states[i], 1)
        call += 1
    for s in states:
        backend.release(s)
    return probes


def test_head_dim_8_runs_in_every_layout_and_backend(tmp_path):
    from edgeloop.presets import make_hf_checkpoint

    cfg = dict(TINY["llama"], hidden_size=48, num_attention_heads=6, num_key_value_heads=2)
    edgeloop.convert(make_hf_checkpoint(cfg, tmp_path / "hf"), tmp_path / "md", loops=2, lora_rank=4)
    ref = edgeloop.load(tmp_path / "md")
    ids = list(range(5, 25))
    expected = ref.logits(ids)
    variants = [dict(layout="unrolled"), dict(layout="loop"), dict(layout="unrolled", target="mobile")]
    try:
        import tvm  # noqa: F401

        variants.append(dict(backend="tvm"))
    except ImportError:
        pass
    for i, options in enumerate(variants):
        edgeloop.compile(tmp_path / "md", tmp_path / f"a{i}", **options)
        model = edgeloop.load(tmp_path / f"a{i}")
        assert np.abs(model.logits(ids) - expected).max() <= TOL, options
        assert model.generate(["ab", "cde"], max_new_tokens=4, ignore_eos=True) == [
            ref.generate(p, max_new_tokens=4, ignore_eos=True) for p in ("ab", "cde")]


def test_debug_dump_writes_every_pass(converted, tmp_path):
    from edgeloop.compiler.onnx_pipeline import PASSES

    md = converted("llama", loops=2, lora_rank=4)
    edgeloop.compile(md, tmp_path / "a", quant="int4", debug_dump=str(tmp_path / "dump"))
    passes = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert passes == ["00-build"] + [f"{i:02d}-{name}" for i, (name, _) in enumerate(PASSES, start=1)]
    for p in passes:
        files = sorted(f.name for f in (tmp_path / "dump" / p).iterdir())
        assert files == ["block.txt", "block_dense.txt", "epilogue.txt", "forward.txt", "kv_fill.txt", "prologue.txt"]
    quantized = (tmp_path / "dump" / "01-quantize" / "forward.txt").read_text()
    assert "MatMulNBits" in quantized and "MatMulNBits" not in (tmp_path / "dump" / "00-build" / "forward.txt").read_text()
    assert not (tmp_path / "a" / "debug").exists()  # the artifact holds only what runs
    pytest.importorskip("tvm")
    edgeloop.compile(md, tmp_path / "t", backend="tvm", debug_dump=str(tmp_path / "tdump"))
    dumped = sorted(p.name for p in (tmp_path / "tdump").iterdir())
    assert dumped[0] == "000-built.py" and len(dumped) > 20 and any("LegalizeOps" in n for n in dumped)


def test_tvm_host_loop_feeds_long_prompts_in_prefill_chunks(compiled):
    """A prompt longer than the paged cache's prefill chunk goes through the host-driven loop chunk by
    chunk (as the fused path does): same logits and tokens as with a chunk that holds it whole."""
    model = compiled("llama", "tvm")
    prompt = list(_prompts(1, model.backend.vocab_size, seed=3)[0]) * 3  # ~20-40 tokens
    expected = model.generate_tokens(prompt, max_new_tokens=4, ignore_eos=True, exit="depth:2")
    fresh = edgeloop.load(model.path)
    fresh.backend._chunk = 8  # the cache of every state made from now on takes 8 tokens per call
    assert len(prompt) > 8
    assert fresh.generate_tokens(prompt, max_new_tokens=4, ignore_eos=True, exit="depth:2") == expected
    assert fresh.generate_tokens(prompt, max_new_tokens=4, ignore_eos=True) == \
        model.generate_tokens(prompt, max_new_tokens=4, ignore_eos=True)
