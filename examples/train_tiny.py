#!/usr/bin/env python3
"""Train a tiny Llama-architecture language model on the King James Bible.

The result (``examples/kjv-tiny/``) is a small but *real* Hugging Face
checkpoint: a ``LlamaForCausalLM`` with grouped-query attention, tied
embeddings and a byte-level BPE tokenizer.  It is small enough to ship in the
repository and to run on a laptop CPU, yet it has been trained, so it gives
meaningful perplexities and recognisable generations for tests of loaders,
runtimes and quantizers.

Data: the KJV text from Debian's ``bible-kjv-text`` package, dumped with the
``bible`` command (package ``bible-kjv``), or any text file via
``--text-file``.  The final books (about 3% of the text) are held out; a slice
of them is saved as ``heldout.txt`` next to the checkpoint.

Usage (the shipped checkpoint was made with the defaults)::

    python examples/train_tiny.py                # 8 minutes on 2 CPU cores
    python examples/train_tiny.py --minutes 1 --out /tmp/kjv-test
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

EOT = "<|endoftext|>"  # the only special token; id 0, used as both BOS and EOS
EOT_ID = 0
HERE = Path(__file__).resolve().parent
# `bible -f` switches pretty-printing *off*: one verse per line, each prefixed
# by its reference ("Ge1:1 In the beginning ..."), which we need to find books.
BIBLE_CMD = ["bible", "-f", "Gen1:1-Rev22:21"]
VERSE_RE = re.compile(r"^(\d?[A-Za-z]+)\d+:\d+ (.*)$")
SAMPLE_PROMPTS = ["And God said", "In the beginning"]


def parse_args() -> argparse.Namespace:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgeloop" / "kjv.txt"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--text-file", type=Path, default=None,
                   help="training text; default: dump the KJV with the `bible` command")
    p.add_argument("--cache-file", type=Path, default=cache, help="where the `bible` dump is cached")
    p.add_argument("--out", type=Path, default=HERE / "kjv-tiny", help="output checkpoint directory")
    p.add_argument("--heldout-frac", type=float, default=0.03, help="fraction of text held out (at the end)")
    p.add_argument("--heldout-slice-bytes", type=int, default=50_000, help="size of the saved heldout.txt")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=704)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256, help="training / evaluation window length")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--min-lr-frac", type=float, default=0.1, help="final lr as a fraction of --lr")
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--bos-frac", type=float, default=0.5,
                   help="fraction of training windows that start with BOS")
    p.add_argument("--minutes", type=float, default=8.0, help="wall-clock budget for the training loop")
    p.add_argument("--max-steps", type=int, default=5000, help="hard cap on optimizer steps")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


# --------------------------------------------------------------------------- data

def load_raw_text(text_file: Path | None, cache_file: Path) -> str:
    """Return the corpus text, dumping it with `bible` (and caching it) if needed."""
    if text_file is not None:
        if not text_file.is_file():
            sys.exit(f"error: --text-file {text_file} does not exist")
        return text_file.read_text(encoding="utf-8")
    if cache_file.is_file():
        return cache_file.read_text(encoding="utf-8")
    if shutil.which(BIBLE_CMD[0]) is None:
        sys.exit("error: no text: pass --text-file PATH, or install the `bible-kjv` "
                 "package (provides the `bible` command) to dump the King James Bible")
    res = subprocess.run(BIBLE_CMD, capture_output=True, text=True)
    if res.returncode != 0 or not res.stdout.startswith("Ge1:1 "):
        sys.exit(f"error: `{' '.join(BIBLE_CMD)}` failed (rc={res.returncode}): "
                 f"{res.stderr.strip()[:200] or 'unexpected output'}")
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    cache_file.write_text(res.stdout, encoding="utf-8")
    return res.stdout


def parse_lines(raw: str) -> list[tuple[str | None, str]]:
    """Split into (book, line) pairs.

    Verse references are stripped so the model learns plain prose, but the book
    is kept so the held-out split can start at a book boundary.  Lines of a
    plain text file (no references) get book None.
    """
    out = []
    for line in raw.splitlines():
        m = VERSE_RE.match(line)
        if m:
            out.append((m.group(1), m.group(2)))
        elif line.strip():
            out.append((None, line))
    return out


def split_heldout(lines: list[tuple[str | None, str]], frac: float) -> tuple[str, str]:
    """Hold out the last ~`frac` of the text, contiguously.

    The cut is moved to the book boundary nearest to the target so no book is
    split between train and held-out (for the KJV: James .. Revelation).
    """
    sizes = [len(text) + 1 for _, text in lines]
    target, cum, cut = (1 - frac) * sum(sizes), 0, len(lines) - 1
    for i, size in enumerate(sizes):  # first line at/after the target position
        if cum >= target:
            cut = i
            break
        cum += size
    boundaries = [i for i in range(1, len(lines)) if lines[i][0] != lines[i - 1][0]]
    if lines[cut][0] is not None and boundaries:
        cut = min(boundaries, key=lambda b: abs(b - cut))
    join = lambda part: "\n".join(text for _, text in part) + "\n"
    return join(lines[:cut]), join(lines[cut:])


def heldout_slice(heldout: str, max_bytes: int) -> str:
    """The first whole lines of the held-out text, at most `max_bytes` long."""
    cut = heldout.rfind("\n", 0, max_bytes)
    return heldout[: cut + 1] if cut >= 0 else heldout


# --------------------------------------------------------------------------- tokenizer

def train_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style) so that any string round-trips exactly."""
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: a leading space would break decode(encode(s)) == s.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],  # first special token -> id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even unseen ones
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    assert tok.token_to_id(EOT) == EOT_ID
    return tok


def save_tokenizer(tok: Tokenizer, out: Path, max_len: int) -> None:
    tok.save(str(out / "tokenizer.json"))
    # Written by hand (not via PreTrainedTokenizerFast.save_pretrained) so the
    # file is the same whatever transformers version runs this script.
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def encode(tok: Tokenizer, text: str) -> torch.Tensor:
    # Encode line by line: much faster than one 4 MB string, and identical
    # because the pre-tokenizer never merges across a newline.
    lines = text.splitlines(keepends=True)
    ids = [i for enc in tok.encode_batch(lines) for i in enc.ids]
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------- model

def build_model(args: argparse.Namespace) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,  # GQA: 2 query heads per KV head
        max_position_embeddings=2048,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=EOT_ID,
        eos_token_id=EOT_ID,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=EOT_ID, eos_token_id=EOT_ID)
    return model


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights counted once


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    # No weight decay on norm gains (1-D): decaying them towards 0 only hurts.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


def lr_at(step: int, progress: float, warm_progress: float, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine decay to min_lr_frac * lr.

    `progress` in [0, 1] is how far through the run we are; it is measured in
    wall-clock time *or* steps, whichever is further, so the cosine ends when
    the time budget does even though the step count is not known in advance.
    """
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    t = min(1.0, (progress - warm_progress) / max(1e-9, 1.0 - warm_progress))
    lo = args.lr * args.min_lr_frac
    return lo + 0.5 * (args.lr - lo) * (1.0 + math.cos(math.pi * t))


def sample_batch(stream: torch.Tensor, args: argparse.Namespace, gen: torch.Generator) -> torch.Tensor:
    """Random windows of seq_len tokens; some start with BOS.

    Users of the checkpoint may or may not prepend BOS to a prompt, so the
    model sees both: a window that starts with BOS and one that starts
    mid-text.
    """
    starts = torch.randint(0, len(stream) - args.seq_len, (args.batch_size,), generator=gen)
    batch = torch.stack([stream[s : s + args.seq_len] for s in starts.tolist()])
    with_bos = torch.rand(args.batch_size, generator=gen) < args.bos_frac
    batch[with_bos, 0] = EOT_ID
    return batch


def train(model, stream: torch.Tensor, args: argparse.Namespace) -> tuple[int, float]:
    """Train until the time budget or the step cap runs out; returns (steps, seconds)."""
    gen = torch.Generator().manual_seed(args.seed)
    opt = make_optimizer(model, args)
    budget = args.minutes * 60.0
    model.train()
    t0, step, warm_progress, tokens = time.time(), 0, 0.0, 0
    while step < args.max_steps:
        elapsed = time.time() - t0
        progress = max(step / args.max_steps, elapsed / budget)
        if progress >= 1.0:
            break
        if step == args.warmup_steps:
            warm_progress = progress
        lr = lr_at(step, progress, warm_progress, args)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = sample_batch(stream, args, gen)
        loss = model(input_ids=batch, labels=batch).loss  # HF shifts labels internally
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += batch.numel()
        if step % args.log_every == 0 or step == 1:
            el = time.time() - t0
            print(f"step {step:5d}  loss {loss.item():.3f}  lr {lr:.2e}  "
                  f"{el:6.0f}s  {tokens / el:,.0f} tok/s", flush=True)
    return step, time.time() - t0


@torch.no_grad()
def perplexity(model, stream: torch.Tensor, seq_len: int, batch_size: int = 16) -> float:
    """exp(mean next-token loss) over non-overlapping seq_len windows (no BOS).

    Every token of a window but the first is predicted, so each window scores
    seq_len - 1 tokens; the ragged tail shorter than a window is dropped.
    """
    model.eval()
    n = len(stream) // seq_len
    windows = stream[: n * seq_len].view(n, seq_len)
    total, count = 0.0, 0
    for i in range(0, n, batch_size):
        x = windows[i : i + batch_size]
        logits = model(input_ids=x).logits.float()
        total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                 x[:, 1:].reshape(-1), reduction="sum").item()
        count += x[:, 1:].numel()
    return math.exp(total / count)


@torch.no_grad()
def generate(model, tok: Tokenizer, prompt: str, n_tokens: int = 40) -> str:
    ids = torch.tensor([tok.encode(prompt).ids])
    out = model.generate(ids, max_new_tokens=n_tokens, do_sample=False,
                         pad_token_id=EOT_ID, attention_mask=torch.ones_like(ids))
    return tok.decode(out[0].tolist())


# --------------------------------------------------------------------------- saving

def save_model_fp16(model: LlamaForCausalLM, out: Path) -> None:
    model.half()
    model.config.dtype = torch.float16  # recorded in config.json ("dtype"/"torch_dtype")
    kwargs = {}
    # transformers 4.x needs safe_serialization=True for .safetensors; 5.x
    # always writes safetensors and dropped the flag.
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True
    model.save_pretrained(out, **kwargs)


def write_readme(out: Path, args: argparse.Namespace, metrics: dict, samples: dict) -> None:
    cmd = "python examples/train_tiny.py " + " ".join(sys.argv[1:])
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    sample_md = "\n".join(f"- `{p}` → {json.dumps(s)}" for p, s in samples.items())
    text = f"""# kjv-tiny

A tiny Llama-architecture causal language model trained from scratch on the
King James Bible, for testing edgeloop end to end with a real (if small)
trained checkpoint.  Made by `examples/train_tiny.py`:

```
{cmd.strip()}
```

torch {torch.__version__}, {args.threads} CPU threads, seed {args.seed}.

## Model

`LlamaForCausalLM`, stored as float16 safetensors ({size / 1e6:.1f} MB for the whole directory).

| | |
|---|---|
| vocab | {args.vocab_size} (byte-level BPE, `<|endoftext|>` = id 0 is BOS and EOS) |
| hidden / intermediate | {args.hidden} / {args.intermediate} |
| layers | {args.layers} |
| attention heads / KV heads | {args.heads} / {args.kv_heads} (GQA, head dim {args.hidden // args.heads}) |
| max positions / rope theta | 2048 / 10000 |
| norm | RMSNorm, eps 1e-5 |
| embeddings | tied input/output |
| parameters | {metrics['params']:,} |

## Data and training

Text: `bible -f Gen1:1-Rev22:21` (Debian `bible-kjv` / `bible-kjv-text`),
verse references stripped, one verse per line.  The last {args.heldout_frac:.0%}
of the text, cut at the nearest book boundary (James to Revelation,
{metrics['heldout_tokens']:,} tokens), is held out; `heldout.txt` is its first
{args.heldout_slice_bytes // 1000} KB.  The tokenizer was trained on the training split only.

Training: random {args.seq_len}-token windows (half of them starting with BOS),
batch {args.batch_size}, AdamW (betas 0.9/0.95, weight decay {args.weight_decay}),
peak lr {args.lr:g}, {args.warmup_steps} warmup steps then cosine decay to
{args.min_lr_frac:g}x over the {args.minutes:g}-minute budget.
{metrics['steps']} steps, {metrics['tokens_seen']:,} tokens seen, {metrics['train_seconds']:.0f} s.

## Results

Held-out perplexity **{metrics['heldout_perplexity']:.2f}**: the float16
checkpoint as saved here, loaded back in float32, over non-overlapping
{args.seq_len}-token windows of the whole held-out split (no BOS;
{args.seq_len - 1} predicted tokens per window).  Before the float16 cast it
was {metrics['heldout_perplexity_fp32_trained']:.2f}.

Greedy samples (40 new tokens, no BOS):

{sample_md}
"""
    (out / "README.md").write_text(text)


def publish(tmp: Path, out: Path) -> None:
    """Swap the finished temp dir into place, so a crash never leaves half a checkpoint."""
    if out.exists():
        old = out.with_name(out.name + f".old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


# --------------------------------------------------------------------------- main

def main() -> None:
    args = parse_args()
    # Turn SIGTERM into SystemExit so the temp dir below is cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("error: terminated"))
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    lines = parse_lines(load_raw_text(args.text_file, args.cache_file))
    train_text, heldout_text = split_heldout(lines, args.heldout_frac)
    print(f"text: {len(train_text):,} train chars, {len(heldout_text):,} held-out chars")

    out = args.out.resolve()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        (tmp / "heldout.txt").write_text(heldout_slice(heldout_text, args.heldout_slice_bytes))

        tok = train_tokenizer(train_text, args.vocab_size)
        assert tok.decode(tok.encode(heldout_text[:5000]).ids) == heldout_text[:5000]
        train_ids, heldout_ids = encode(tok, train_text), encode(tok, heldout_text)
        print(f"tokens: {len(train_ids):,} train, {len(heldout_ids):,} held-out")

        model = build_model(args)
        params = count_params(model)
        print(f"model: {params:,} parameters")
        steps, seconds = train(model, train_ids, args)
        ppl_fp32 = perplexity(model, heldout_ids, args.seq_len)
        print(f"trained {steps} steps in {seconds:.0f}s; held-out ppl (fp32) {ppl_fp32:.2f}")

        save_model_fp16(model, tmp)
        save_tokenizer(tok, tmp, max_len=2048)

        # The number that matters: what a user of the saved fp16 checkpoint gets.
        reloaded = LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        ppl = perplexity(reloaded, heldout_ids, args.seq_len)
        samples = {p: generate(reloaded, tok, p) for p in SAMPLE_PROMPTS}
        print(f"held-out ppl (fp16 checkpoint, loaded as fp32) {ppl:.2f}")
        for p, s in samples.items():
            print(f"  {s!r}")

        metrics = {
            "heldout_perplexity": round(ppl, 4),
            "params": params,
            "train_seconds": round(seconds, 1),
            "steps": steps,
            "heldout_perplexity_fp32_trained": round(ppl_fp32, 4),
            "heldout_tokens": len(heldout_ids),
            "tokens_seen": steps * args.batch_size * args.seq_len,
        }
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        write_readme(tmp, args, metrics, samples)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"saved {out}")


if __name__ == "__main__":
    main()
