"""Native (C++) tokenizer parity with the Python `tokenizers` library.

Builds runtimes/native (cmake) once per module and drives `tokenizer_tool` over its JSON-lines
protocol. Every tokenizer family the runtime supports is covered: the bundled kjv-tiny
tokenizer plus small BPE tokenizers trained here in the style of Llama-2/Mistral/TinyLlama,
Metaspace (also its legacy JSON form and after leading-character-deleting normalizers), Llama-3,
Qwen2, Gemma, GPT-NeoX, the edgeloop byte tokenizer, and configurations exercising the remaining
supported components (NFD/NFKC/NFKD, Lowercase, Strip, regex Replace, every Split behavior,
Whitespace, WhitespaceSplit, Digits, ByteLevel add_prefix_space, subword prefix/suffix, unk).
Each is checked on the held-out text (lines and whole), hand-written cases, added tokens in
context and random strings (encode ids), and on decode of those ids and of random id sequences
(skip_special_tokens both ways).

The module is skipped when cmake / a C++ compiler / the libraries are missing, unless
EDGELOOP_REQUIRE_NATIVE=1 (then it fails).
"""

from __future__ import annotations

import json
import random
import subprocess
import zlib
from pathlib import Path

import pytest

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, trainers  # noqa: E402
from tokenizers import normalizers as N  # noqa: E402
from tokenizers import pre_tokenizers as P  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NATIVE = REPO / "runtimes" / "native"
KJV = REPO / "examples" / "kjv-tiny"

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")

HAND_CASES = [
    "", " ", "  ", "\t", "\n", "Hello world", " Hello  world ", "Hello\tworld\t\ttabs",
    "line1\nline2\n\nline3\n", "windows\r\nline\r\n\r\n", "   leading and trailing   ", "\n\n\n  \n",
    "trailing spaces before newline   \nnext", "a  b   c    d     e",
    "12345 678 9 1234567890 3.14159 1,000,000 0x1F 2024-01-31",
    "\u0663\u0664\u0665 \u00b2\u00b3 \u216b \uff11\uff12\uff13",
    "I'm you're he's we've they'll I'd can't o'clock",
    "I'M YOU'RE HE'S WE'VE THEY'LL I'D CAN'T 'S 'T",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00c5ngstr\u00f6m \u00fcber stra\u00dfe",
    "e\u0301 a\u0300 o\u0308 A\u030a \u1e9b\u0323 \u0065\u0301\u0302",  # combining marks that NFC composes
    "\ufb01 \ufb02 \u2460 \uff48\uff45\uff4c\uff4c\uff4f \u2126 \u212b \u00bd",  # NFKC changes these
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \u4e2d\u6587\u6587\u672c \ud55c\uad6d\uc5b4",
    "emoji \U0001f600 \U0001f44d\U0001f3fd \U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466"
    " \U0001f3f3\ufe0f\u200d\U0001f308",
    "mixed: a\U0001f600b c\u2713d e\u20acf",
    "tabs\tand\u00a0nbsp\u2003em-space\u3000ideographic\u200bzwsp",
    "\x85nel\u2028ls\u2029ps\u180emvs\x1cfs",
    "punctuation!!! ??? ... --- ((())) [x] {y} <z> @#$%^&*_+=|\\/~`",
    "\u0000 control \u0007 chars \u001b[0m \x7f",
    "\u01c5 \u0130stanbul \u00df \u1e9e \u03a3\u03a3 \u0391\u0392\u0393",
    "\u0627\u0644\u0639\u0631\u0628\u064a\u0629 \u05e2\u05d1\u05e8\u05d9\u05ea \u0939\u093f\u0928\u094d\u0926\u0940",
    "zzzz qqqq xyzzy \u2295\u2297 \u222e \U00010348 \U0001d11e",
    "a" * 300,
    "The quick brown fox jumps over the lazy dog. " * 3,
    "And God said, Let there be light: and there was light.",
    "word\u2581with\u2581metaspace \u2581lead",
    "<0x41> <unk> not-a-token <|x|>",
]


@pytest.fixture(scope="module")
def tool(tmp_path_factory) -> Path:
    """Configure and build runtimes/native once (shared with the other native test modules and the
    pytest-xdist workers, see test_native_build.py); returns the tokenizer_tool executable."""
    from test_native_build import native_build

    exe = native_build(tmp_path_factory, "tokenizer_tool", runtime=False) / "tokenizer_tool"
    assert exe.exists()
    return exe


def run_tool(exe: Path, tokenizer_json: Path, requests: list[dict], expect_rc: int = 0) -> list[dict]:
    data = "".join(json.dumps(r) + "\n" for r in requests).encode()
    proc = subprocess.run([str(exe), str(tokenizer_json)], input=data, capture_output=True, timeout=300)
    assert proc.returncode == expect_rc, proc.stdout.decode(errors="replace")[-2000:] + proc.stderr.decode()[-2000:]
    return [json.loads(line) for line in proc.stdout.decode().split("\n") if line]


# ------------------------------------------------------------------------------- tokenizers

def _corpus_lines() -> list[str]:
    return (KJV / "heldout.txt").read_text(encoding="utf-8").splitlines()


def _train(lines, *, normalizer=None, pre_tokenizer=None, vocab_size=800, alphabet=(), **model_kwargs):
    """Train a small BPE; returns (tokens in id order, merges as pairs)."""
    tok = Tokenizer(models.BPE(**model_kwargs))
    if normalizer is not None:
        tok.normalizer = normalizer
    if pre_tokenizer is not None:
        tok.pre_tokenizer = pre_tokenizer
    trainer_kwargs = {k: v for k, v in model_kwargs.items() if k in ("continuing_subword_prefix", "end_of_word_suffix")}
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, initial_alphabet=list(alphabet),
                                  **trainer_kwargs)
    tok.train_from_iterator(lines, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = model["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
    return sorted(vocab, key=vocab.get), merges


def _assemble(path: Path, tokens, merges, *, head=(), byte_tokens=False, normalizer=None, pre_tokenizer=None,
              decoder=None, specials=(), added=(), legacy_merges=False, **bpe_kwargs) -> Path:
    """Build the final tokenizer.json: `head` tokens first, then <0xXX> tokens, then the trained ones."""
    order = list(head) + ([f"<0x{b:02X}>" for b in range(256)] if byte_tokens else [])
    order += [t for t in tokens if t not in set(order)]
    vocab = {t: i for i, t in enumerate(order)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges), **bpe_kwargs))
    if normalizer is not None:
        tok.normalizer = normalizer
    if pre_tokenizer is not None:
        tok.pre_tokenizer = pre_tokenizer
    if decoder is not None:
        tok.decoder = decoder
    tok.add_special_tokens([s if isinstance(s, AddedToken) else AddedToken(s, special=True, normalized=False)
                            for s in specials])
    tok.add_tokens(list(added))
    tok.save(str(path))
    if legacy_merges:  # the older "a b" string form of merges (e.g. Llama-2's tokenizer.json)
        data = json.loads(path.read_text(encoding="utf-8"))
        data["model"]["merges"] = [" ".join(m) for m in data["model"]["merges"]]
        path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def build_llama2(d: Path) -> Path:
    """Llama-2 / Mistral / TinyLlama: SentencePiece-style BPE with byte fallback, no pre-tokenizer."""
    norm = N.Sequence([N.Prepend("\u2581"), N.Replace(" ", "\u2581")])
    tokens, merges = _train(_corpus_lines(), normalizer=norm)
    return _assemble(
        d / "llama2.json", tokens, merges, head=("<unk>", "<s>", "</s>"), byte_tokens=True, normalizer=norm,
        decoder=decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                   decoders.Strip(" ", 1, 0)]),
        specials=("<unk>", "<s>", "</s>"),
        added=[AddedToken("<|note|>", special=False), AddedToken("[TOOL]", special=False, normalized=False)],
        legacy_merges=True, unk_token="<unk>", byte_fallback=True, fuse_unk=True)


def _metaspace(d: Path, name: str, scheme: str) -> Path:
    pre = P.Metaspace(replacement="\u2581", prepend_scheme=scheme)
    tokens, merges = _train(_corpus_lines(), pre_tokenizer=pre, vocab_size=600)
    return _assemble(
        d / f"{name}.json", tokens, merges, head=("<unk>", "<s>", "</s>"), pre_tokenizer=pre,
        decoder=decoders.Metaspace(replacement="\u2581", prepend_scheme=scheme),
        specials=("<unk>", "<s>", "</s>"), added=[AddedToken("[INST]", special=False), AddedToken("[/INST]")],
        unk_token="<unk>", fuse_unk=True)


def build_metaspace(d: Path) -> Path:
    """Older Llama/Mistral conversions: Metaspace pre-tokenizer and decoder, unk instead of bytes."""
    return _metaspace(d, "metaspace", "first")


def build_metaspace_legacy(d: Path) -> Path:
    """Metaspace in its legacy JSON form (add_prefix_space instead of prepend_scheme)."""
    path = _metaspace(d, "metaspace_legacy", "always")
    data = json.loads(path.read_text(encoding="utf-8"))
    for key in ("pre_tokenizer", "decoder"):
        data[key] = {"type": "Metaspace", "replacement": "\u2581", "str_rep": "\u2581", "add_prefix_space": True}
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def build_metaspace_norm(d: Path) -> Path:
    """Metaspace(prepend_scheme="first") after normalizers that delete leading characters."""
    norm = N.Sequence([N.Replace("_", ""), N.Strip(left=True, right=False)])
    pre = P.Metaspace(replacement="\u2581", prepend_scheme="first")
    tokens, merges = _train(_corpus_lines(), normalizer=norm, pre_tokenizer=pre, vocab_size=500)
    return _assemble(d / "metaspace_norm.json", ["<unk>"] + tokens, merges, normalizer=norm, pre_tokenizer=pre,
                     decoder=decoders.Metaspace(replacement="\u2581", prepend_scheme="first"), specials=["<s>"],
                     added=[AddedToken("_x_", special=False), AddedToken("hi", special=False, normalized=False)],
                     unk_token="<unk>")


def build_gpt2_prefix(d: Path) -> Path:
    """kjv-tiny's vocabulary with NFD, Digits (contiguous) and ByteLevel(add_prefix_space=True)."""
    tok = Tokenizer.from_file(str(KJV / "tokenizer.json"))
    tok.normalizer = N.NFD()
    tok.pre_tokenizer = P.Sequence([P.Digits(individual_digits=False), P.ByteLevel(add_prefix_space=True)])
    tok.add_tokens([AddedToken(" Amen", special=False), AddedToken("<|raw|>", special=False, normalized=False)])
    tok.add_special_tokens([AddedToken("<|start|>", special=True)])
    tok.save(str(d / "gpt2_prefix.json"))
    return d / "gpt2_prefix.json"


def _byte_level_split(d: Path, name: str, pattern: str, *, normalizer=None, specials, added, **bpe_kwargs):
    pre = P.Sequence([P.Split(Regex(pattern), behavior="isolated", invert=False),
                      P.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tokens, merges = _train(_corpus_lines(), normalizer=normalizer, pre_tokenizer=pre,
                            alphabet=P.ByteLevel.alphabet())
    return _assemble(d / f"{name}.json", tokens, merges, normalizer=normalizer, pre_tokenizer=pre,
                     decoder=decoders.ByteLevel(), specials=specials, added=added, **bpe_kwargs)


def build_llama3(d: Path) -> Path:
    """Llama-3: Split(Llama-3 regex) + ByteLevel(use_regex=False), ignore_merges."""
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    specials += [f"<|reserved_special_token_{i}|>" for i in range(12)]
    return _byte_level_split(d, "llama3", LLAMA3_PATTERN, specials=specials,
                             added=[AddedToken("<|python_tag|>", special=False), AddedToken(" custom phrase")],
                             ignore_merges=True)


def build_qwen2(d: Path) -> Path:
    """Qwen2: NFC + Split(Qwen2 regex) + ByteLevel(use_regex=False)."""
    return _byte_level_split(
        d, "qwen2", QWEN2_PATTERN, normalizer=N.NFC(), specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        added=[AddedToken("<tool_call>", special=False, normalized=False),
               AddedToken("</tool_call>", special=False, normalized=False), AddedToken("caf\u00e9 au lait")])


def build_gemma(d: Path) -> Path:
    """Gemma: Replace(" ", "▁") normalizer, byte fallback, no pre-tokenizer."""
    norm = N.Replace(" ", "\u2581")
    tokens, merges = _train(_corpus_lines(), normalizer=norm, vocab_size=700)
    head = ("<pad>", "<eos>", "<bos>", "<unk>")
    return _assemble(
        d / "gemma.json", tokens, merges, head=head, byte_tokens=True, normalizer=norm,
        decoder=decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]),
        specials=head + ("<start_of_turn>", "<end_of_turn>"),
        added=[AddedToken("<unused0>", special=False, normalized=False), AddedToken("hello world", special=False)],
        unk_token="<unk>", byte_fallback=True, fuse_unk=False)


def build_neox(d: Path) -> Path:
    """GPT-NeoX / Pythia: NFC + ByteLevel pre-tokenizer; multi-space added tokens; strip options."""
    pre = P.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tokens, merges = _train(_corpus_lines(), normalizer=N.NFC(), pre_tokenizer=pre, alphabet=P.ByteLevel.alphabet())
    return _assemble(
        d / "neox.json", tokens, merges, normalizer=N.NFC(), pre_tokenizer=pre, decoder=decoders.ByteLevel(),
        specials=["<|endoftext|>", "<|padding|>", AddedToken("<|mask|>", special=True, lstrip=True, rstrip=True)],
        added=[AddedToken("  ", special=False), AddedToken("   ", special=False), AddedToken("    ", special=False),
               AddedToken("foobar", special=False, single_word=True),
               AddedToken("<sep>", special=False, normalized=False, lstrip=True)])


def build_byte(d: Path) -> Path:
    """edgeloop's tiny byte tokenizer (presets.write_byte_tokenizer), plus one non-special token."""
    from edgeloop.presets import write_byte_tokenizer

    out = d / "byte"
    out.mkdir()
    write_byte_tokenizer(out, 320, 1, 2)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tok.add_tokens([AddedToken("<|sep|>", special=False)])
    tok.save(str(out / "tokenizer.json"))
    return out / "tokenizer.json"


def build_misc(d: Path) -> Path:
    """Other components: NFKD/Lowercase/Strip, Whitespace + Digits, subword prefix/suffix, unk, no decoder."""
    norm = N.Sequence([N.NFKD(), N.Lowercase(), N.Strip()])
    pre = P.Sequence([P.Whitespace(), P.Digits(individual_digits=True)])
    kwargs = dict(continuing_subword_prefix="##", end_of_word_suffix="</w>")
    tokens, merges = _train(_corpus_lines()[:200], normalizer=norm, pre_tokenizer=pre, vocab_size=500, **kwargs)
    return _assemble(d / "misc.json", ["[UNK]"] + tokens, merges, normalizer=norm, pre_tokenizer=pre,
                     specials=["[CLS]", "[SEP]"], added=[AddedToken("Lord", special=False)], unk_token="[UNK]",
                     **kwargs)


def build_splits(d: Path) -> Path:
    """Split behaviors, String/Regex patterns, Replace with a regex, WhitespaceSplit, NFKC."""
    norm = N.Sequence([N.NFKC(), N.Replace(Regex(r"\s{2,}"), " ")])
    pre = P.Sequence([P.Split(Regex(r"\w+"), behavior="removed", invert=True),
                      P.Split(Regex(r"\d+"), behavior="contiguous"),
                      P.Split(Regex(r"[aeiou]"), behavior="merged_with_previous"),
                      P.Split("th", behavior="merged_with_next"),
                      P.Split(Regex(r"(?=s)"), behavior="isolated")])
    tokens, merges = _train(_corpus_lines(), normalizer=norm, pre_tokenizer=pre, vocab_size=500)
    return _assemble(d / "splits.json", ["<unk>"] + tokens, merges, normalizer=norm, pre_tokenizer=pre,
                     decoder=decoders.Sequence([decoders.Replace(Regex("[aeiou]"), "*"), decoders.Strip("*", 0, 1)]),
                     specials=["<s>"], added=[AddedToken("xyz", special=False)], unk_token="<unk>")


def build_whitespace_split(d: Path) -> Path:
    pre = P.WhitespaceSplit()
    tokens, merges = _train(_corpus_lines(), pre_tokenizer=pre, vocab_size=500)
    return _assemble(d / "wsplit.json", ["<unk>"] + tokens, merges, pre_tokenizer=pre, normalizer=N.Lowercase(),
                     decoder=decoders.Fuse(), specials=["<s>"], added=[AddedToken("amen", special=False)],
                     unk_token="<unk>")


BUILDERS = {
    "kjv": lambda d: KJV / "tokenizer.json",
    "llama2": build_llama2,
    "metaspace": build_metaspace,
    "metaspace_legacy": build_metaspace_legacy,
    "metaspace_norm": build_metaspace_norm,
    "llama3": build_llama3,
    "qwen2": build_qwen2,
    "gemma": build_gemma,
    "neox": build_neox,
    "byte": build_byte,
    "gpt2_prefix": build_gpt2_prefix,
    "misc": build_misc,
    "splits": build_splits,
    "wsplit": build_whitespace_split,
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("native-tokenizers")


# ------------------------------------------------------------------------------- parity

FUZZ_ATOMS = [" ", "  ", "   ", "\t", "\n", "\r\n", "\r", "\n\n", "a", "Z", "the", "The", "God", "\u00e9", "e\u0301",
              "\u0301", "'s", "'S", "'ll", "'", "1", "123", "4567", "\u0663", "\u00b2", "\u65e5\u672c", "\U0001f600",
              "\U0001f468\u200d\U0001f469", "\u200d", "\u00a0", "\u2581", "<", "|", ">", "\x85", "\u3000",
              "\u0130", "\u00df", "\ufb01", "\u2014", "...", "!", "?!", "_", "\x00", "\u2028", "x", "lord", "foo",
              "bar", "##", "</w>", "th", "\uff48", "\u00c5"]


def _texts_for(hf: Tokenizer, rng: random.Random) -> list[str]:
    heldout = (KJV / "heldout.txt").read_text(encoding="utf-8")
    texts = heldout.splitlines() + [heldout] + list(HAND_CASES)
    # Added tokens (special or not) alone, adjacent to words, doubled, around spaces and newlines.
    added = sorted(hf.get_added_tokens_decoder()[i].content for i in hf.get_added_tokens_decoder())
    for content in added:
        texts += [content, f"word{content}word", f" {content} ", f"{content}{content}", f"x {content}\n{content}y",
                  f"Hello{content} world", f"{content}  and\t{content}\n", f"And {content}God said"]
    # Random strings of awkward pieces, added tokens and their halves included.
    atoms = FUZZ_ATOMS + added * 2 + [a[: len(a) // 2] for a in added]
    texts += ["".join(rng.choice(atoms) for _ in range(rng.randint(1, 20))) for _ in range(250)]
    return texts


def _check(name: str, tool: Path, tokenizer_dir: Path):
    path = BUILDERS[name](tokenizer_dir)
    hf = Tokenizer.from_file(str(path))
    rng = random.Random(zlib.crc32(name.encode()))
    texts = _texts_for(hf, rng)
    enc = [hf.encode(t, add_special_tokens=False).ids for t in texts]

    valid_ids = sorted(set(hf.get_vocab(with_added_tokens=True).values()))
    id_seqs = [ids for ids in enc if ids]
    id_seqs += [[rng.choice(valid_ids) for _ in range(rng.randint(1, 12))] for _ in range(150)]
    for t in ("\u65e5\u672c\u8a9e emoji \U0001f600 \U0001f468\u200d\U0001f469\u200d\U0001f467 caf\u00e9",):
        ids = hf.encode(t, add_special_tokens=False).ids
        id_seqs += [ids[:k] for k in range(1, len(ids) + 1)] + [ids[k:] for k in range(1, len(ids))]

    requests = [{"encode": t} for t in texts]
    requests += [{"decode": ids, "skip_special": skip} for ids in id_seqs for skip in (True, False)]
    requests += [{"vocab_size": True}]
    probe = sorted(hf.get_vocab(with_added_tokens=True))[:50] + ["definitely-not-a-token"]
    requests += [{"token_to_id": t} for t in probe]
    out = run_tool(tool, path, requests)
    assert len(out) == len(requests)

    failures = []
    for t, want, got in zip(texts, enc, out[: len(texts)]):
        if got.get("ids") != want:
            failures.append(f"encode {t[:80]!r}: hf={want[:40]} native={got}"[:400])
    dec_out = out[len(texts): len(texts) + 2 * len(id_seqs)]
    for k, got in enumerate(dec_out):
        ids, skip = id_seqs[k // 2], k % 2 == 0
        want = hf.decode(ids, skip_special_tokens=skip)
        if got.get("text") != want:
            failures.append(f"decode {ids[:20]} skip={skip}: hf={want[:80]!r} native={got}"[:400])
    vocab_out = out[len(texts) + 2 * len(id_seqs)]
    if vocab_out.get("vocab_size") != hf.get_vocab_size(with_added_tokens=True):
        failures.append(f"vocab_size: hf={hf.get_vocab_size(with_added_tokens=True)} native={vocab_out}")
    for t, got in zip(probe, out[-len(probe):]):
        want = hf.token_to_id(t)
        if got.get("id") != (-1 if want is None else want):
            failures.append(f"token_to_id {t!r}: hf={want} native={got}")
    assert not failures, f"{name}: {len(failures)} mismatches out of {len(requests)} requests:\n" + "\n".join(
        failures[:15])
    return len(requests)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_parity(name, tool, tokenizer_dir):
    _check(name, tool, tokenizer_dir)


# ------------------------------------------------------------------------------- errors, speed

def test_encode_speed(tool):
    text = (KJV / "heldout.txt").read_text(encoding="utf-8") * 2  # ~100 KB
    hf = Tokenizer.from_file(str(KJV / "tokenizer.json"))
    (res,) = run_tool(tool, KJV / "tokenizer.json", [{"time_encode": text}])
    assert res["ids"] == hf.encode(text, add_special_tokens=False).ids
    assert res["seconds"] < 1.0, res["seconds"]


def test_invalid_utf8_and_bad_ids(tool):
    requests = [{"encode_bytes": [0x61, 0xFF, 0x62]}, {"encode_bytes": [0xE2, 0x82]}, {"encode_bytes": [0xED, 0xA0, 0x80]},
                {"encode_bytes": [0x68, 0x69]}, {"decode": [10 ** 6]}, {"decode": [-1]}, {"decode": [5, 6]}]
    out = run_tool(tool, KJV / "tokenizer.json", requests)
    assert [("error" in o) for o in out] == [True, True, True, False, True, True, False]
    assert "UTF-8" in out[0]["error"] and "out of range" in out[4]["error"]
    hf = Tokenizer.from_file(str(KJV / "tokenizer.json"))
    assert out[3]["ids"] == hf.encode("hi", add_special_tokens=False).ids
    assert out[6]["text"] == hf.decode([5, 6])


def _kjv_with(**overrides) -> str:
    data = json.loads((KJV / "tokenizer.json").read_text(encoding="utf-8"))
    for key, value in overrides.items():
        if key == "model_type":
            data["model"]["type"] = value
        else:
            data[key] = value
    return json.dumps(data)


@pytest.mark.parametrize("overrides, needle", [
    ({"model_type": "Unigram"}, "Unigram"),
    ({"model_type": "WordPiece"}, "WordPiece"),
    ({"normalizer": {"type": "BertNormalizer"}}, "BertNormalizer"),
    ({"normalizer": {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Precompiled"}]}}, "Precompiled"),
    ({"pre_tokenizer": {"type": "Punctuation", "behavior": "Isolated"}}, "Punctuation"),
    ({"decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True}}, "WordPiece"),
])
def test_unsupported_components_are_refused(tool, tmp_path, overrides, needle):
    path = tmp_path / "tokenizer.json"
    path.write_text(_kjv_with(**overrides), encoding="utf-8")
    (res,) = run_tool(tool, path, [{"encode": "x"}], expect_rc=1)
    assert needle in res["error"] and "unsupported" in res["error"], res


def test_load_errors(tool, tmp_path):
    (res,) = run_tool(tool, tmp_path / "missing.json", [], expect_rc=1)
    assert "cannot open" in res["error"]
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    (res,) = run_tool(tool, bad, [], expect_rc=1)
    assert "invalid JSON" in res["error"] and "\n" not in res["error"]
    dropout = tmp_path / "dropout.json"
    data = json.loads((KJV / "tokenizer.json").read_text(encoding="utf-8"))
    data["model"]["dropout"] = 0.1
    dropout.write_text(json.dumps(data), encoding="utf-8")
    (res,) = run_tool(tool, dropout, [], expect_rc=1)
    assert "dropout" in res["error"]
