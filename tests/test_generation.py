"""The generation engine on ONNX artifacts: sampling, stop strings, streaming, batches, chat."""

import numpy as np
import pytest
import torch

import edgeloop
from edgeloop.runtimes.tokenizer import IncrementalDecoder
from conftest import run_cli


@pytest.fixture(scope="module")
def full_rank(tmp_path_factory, converted):
    out = tmp_path_factory.mktemp("gen") / "llama-full"
    edgeloop.compile(converted("llama", loops=2, lora_rank="full"), out)
    return edgeloop.load(out)


def test_greedy_equals_transformers_generate(full_rank, hf_checkpoint):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_checkpoint("llama"), dtype=torch.float32).eval()
    prompt = [5, 17, 42, 99, 7]
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                          pad_token_id=0, min_new_tokens=32)
    expected = out[0, len(prompt):].tolist()
    assert full_rank.generate_tokens(prompt, max_new_tokens=32, ignore_eos=True) == expected


def test_seeded_sampling_is_reproducible(full_rank):
    options = dict(max_new_tokens=24, temperature=1.0, top_p=0.9, seed=123, ignore_eos=True)
    a = full_rank.generate_tokens([5, 6, 7], **options)
    assert a == full_rank.generate_tokens([5, 6, 7], **options)
    assert a != full_rank.generate_tokens([5, 6, 7], **{**options, "seed": 124})


def test_top_k_one_is_greedy(full_rank):
    greedy = full_rank.generate_tokens([9, 8, 7], max_new_tokens=16, ignore_eos=True)
    assert full_rank.generate_tokens([9, 8, 7], max_new_tokens=16, temperature=1.5, top_k=1, seed=3,
                                     ignore_eos=True) == greedy


def test_stop_strings_stop_at_the_right_place(full_rank):
    text = full_rank.generate("hello", max_new_tokens=40, ignore_eos=True)
    assert len(text) > 6
    stop = text[3:5]
    cut = full_rank.generate("hello", max_new_tokens=40, ignore_eos=True, stop=[stop])
    assert cut == text[: text.find(stop)]
    assert full_rank.last_stats.finish_reason == "stop"


def test_stream_concatenates_to_generate(full_rank):
    options = dict(max_new_tokens=40, temperature=0.9, seed=5, ignore_eos=True)
    pieces = list(full_rank.stream("abc", **options))
    assert "".join(pieces) == full_rank.generate("abc", **options)
    assert len(pieces) > 1


def test_incremental_decoding_never_splits_utf8(full_rank):
    tok = full_rank.tokenizer
    text = "héllo wörld — 世界 🎉 ok"
    ids = tok.encode(text)
    assert len(ids) > len(text)  # byte-level: multi-byte characters span several tokens
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)



@pytest.mark.parametrize("penalty", [None, 1.8])
def test_chat_reuses_kv_and_matches_a_single_pass(full_rank, penalty):
    """A second turn (KV reused) equals generating the whole conversation from scratch, also with a
    repetition penalty, which must see the earlier turns' tokens too."""
    options = dict(max_new_tokens=10, ignore_eos=True, **({"repetition_penalty": penalty} if penalty else {}))
    chat = full_rank.chat(system="be brief", **options)
    chat.send("hello there")
    cached_after_first = len(chat.cached)
    second = chat.send("and again")
    assert cached_after_first > 0 and chat.state.length >= cached_after_first
    # the same conversation, rendered and generated from scratch
    messages = chat.messages[:-1]
    prompt = full_rank.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert full_rank.generate(prompt, **options) == second


def test_chat_penalty_sees_the_whole_conversation(full_rank, monkeypatch):
    """The repetition penalty of a later turn covers the earlier turns' tokens (the KV reuse feeds only
    the new ones)."""
    from edgeloop.runtimes.sampling import Sampler

    seen = []
    original = Sampler.__call__
    monkeypatch.setattr(Sampler, "__call__", lambda self, logits, history=(): (seen.append(list(history)),
                                                                                original(self, logits, history))[1])
    chat = full_rank.chat(max_new_tokens=3, ignore_eos=True, repetition_penalty=1.5)
    chat.send("hello there")
    seen.clear()
    chat.send("and again")
    conversation = full_rank.tokenizer.encode(
        full_rank.tokenizer.apply_chat_template(chat.messages[:-1], add_generation_prompt=True))
    assert seen[0][:len(conversation)] == conversation


def test_perplexity_matches_logits(full_rank):
    text = "the quick brown fox jumps over the lazy dog"
    ids = full_rank.tokenizer.encode(text)
    logits = full_rank.logits(ids[:-1]).astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    expected = np.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean())
    assert full_rank.perplexity(text) == pytest.approx(expected, rel=1e-5)


def test_prompt_beyond_context(full_rank):
    long = "x" * 600  # one token per byte; the tiny models hold 512 positions
    with pytest.raises(edgeloop.EdgeloopError, match="context holds 512"):
        full_rank.generate(long, max_new_tokens=4)
    assert isinstance(full_rank.generate(long, max_new_tokens=4, truncate=True), str)


@pytest.mark.parametrize("flag, value, message", [
    ("--temperature", "-1", "temperature must be in [0, 100]"),
    ("--temperature", "nan", "temperature must be a number"),
    ("--temperature", "inf", "temperature must be a number"),
    ("--temperature", "1e-310", "too small to sample from"),
    ("--repetition-penalty", "nan", "repetition_penalty must be a number"),
    ("--seed", "-1", "seed must be in [0, 18446744073709551615]"),
    ("--top-p", "1.5", "top_p must be in (0, 1]"),
    ("--min-p", "2", "min_p must be in [0, 1)"),
    ("--max-new-tokens", "-3", "max_new_tokens must be in [0, 1048576]"),
    ("--top-k", "many", "Invalid value for '--top-k'"),
])
def test_invalid_options_fail_cleanly(full_rank, flag, value, message):
    r = run_cli("run", full_rank.path, "--prompt", "hi", flag, value)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_run_cli_streams_and_reports_timings(full_rank):
    r = run_cli("run", full_rank.path, "--prompt", "hi", "--max-new-tokens", "8", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("hi") and "decode" in r.stderr and "time to first token" in r.stderr
    r = run_cli("run", full_rank.path, "--prompt", "hi", "--max-new-tokens", "8", "--json")
    assert r.returncode == 0 and '"decode_tok_s"' in r.stdout


def test_missing_artifact_and_long_prompt_cli(full_rank, tmp_path):
    r = run_cli("run", tmp_path / "nothing", "--prompt", "hi")
    assert r.returncode == 2 and "not found" in r.stderr
    r = run_cli("run", full_rank.path, "--prompt", "y" * 700)
    assert r.returncode == 2 and "--truncate" in r.stderr and "Traceback" not in r.stderr


def test_perplexity_and_bench_cli(full_rank, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("in the beginning was the word " * 20)
    r = run_cli("perplexity", full_rank.path, "--text-file", text, "--json")
    assert r.returncode == 0 and '"perplexity"' in r.stdout
    plot = tmp_path / "p.png"
    r = run_cli("bench", full_rank.path, "--contexts", "16,64", "--prefill-tokens", "16", "--decode-steps", "4",
                "--rounds", "1", "--json", "--plot", plot)
    assert r.returncode == 0, r.stderr
    assert '"decode_tok_s"' in r.stdout and plot.stat().st_size > 1000


def test_chat_cli_session(full_rank):
    import os
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "edgeloop", "chat", str(full_rank.path), "--max-new-tokens", "6"],
                       input="hello\nhow are you\n\n", capture_output=True, text=True, timeout=300,
                       env={**os.environ})
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("in cache") == 2  # two turns, the cache kept between them


def test_chat_too_long_keeps_the_conversation(full_rank):
    chat = full_rank.chat(max_new_tokens=4, ignore_eos=True)
    chat.send("hi")
    before = list(chat.messages)
    with pytest.raises(edgeloop.EdgeloopError, match="start a new chat"):
        chat.send("z" * 600)
    assert chat.messages == before
