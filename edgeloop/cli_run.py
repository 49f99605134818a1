"""The running commands of the `edgeloop` CLI: run, chat, perplexity, bench (registered on `cli.app`)."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np
import typer
from rich.table import Table

from edgeloop.cli import _escape, app, err, out
from edgeloop.errors import EdgeloopError


def _generation_options(**options) -> dict:
    options["stop"] = list(options.get("stop") or [])
    return options


@app.command()
def run(
    path: Path = typer.Argument(..., help="artifact (or model dir, run on the PyTorch reference)"),
    prompt: str = typer.Option(..., "--prompt", "-p", help="text to continue"),
    max_new_tokens: int = typer.Option(64, help="tokens to generate"),
    temperature: Optional[float] = typer.Option(None, help="0 = greedy (default unless the model says otherwise)"),
    top_k: Optional[int] = typer.Option(None, help="keep the k most likely tokens (0 = off)"),
    top_p: Optional[float] = typer.Option(None, help="nucleus sampling mass in (0, 1]"),
    min_p: Optional[float] = typer.Option(None, help="drop tokens below min_p x the top probability"),
    repetition_penalty: Optional[float] = typer.Option(None, help="> 1 discourages repeats"),
    seed: Optional[int] = typer.Option(None, help="RNG seed for reproducible sampling (0 .. 2^64-1)"),
    stop: Optional[List[str]] = typer.Option(None, help="stop string (repeatable)"),
    truncate: bool = typer.Option(False, help="keep the end of a prompt longer than the context"),
    exit_policy: Optional[str] = typer.Option(None, "--exit", help="early exit: none | confidence:TAU | "
                                              "agreement[:N] | gate[:THRESHOLD] | speculate:DxN (default: the "
                                              "artifact's calibrated policy)"),
    loops: Optional[int] = typer.Option(None, "--loops", help="at most this many passes of the loop per token"),
    show_depths: bool = typer.Option(False, "--show-depths", help="print each token's loop passes to stderr"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object (text + timings) instead of streaming"),
) -> None:
    """Generate text, streaming it to stdout; timings go to stderr."""
    import edgeloop

    model = edgeloop.load(path)
    config = model.generation_config(**_generation_options(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=repetition_penalty, seed=seed, stop=stop, truncate=truncate, exit=exit_policy, loops=loops))
    pieces = model.stream(prompt, config=config)
    first = next(pieces, None)  # the prompt is checked (tokenized, fitted) before anything is printed
    if as_json:
        text = (first or "") + "".join(pieces)
        out.print_json(json.dumps({"prompt": prompt, "text": text, "stats": model.last_stats.to_dict()}))
        return
    s = model.last_stats
    if s.dropped_prompt_tokens:
        err.print(f"[yellow]note:[/] the prompt was {s.dropped_prompt_tokens + s.prompt_tokens} tokens; kept its last "
                  f"{s.prompt_tokens} (--truncate)")
    sys.stdout.write(prompt)
    for piece in ([first] if first is not None else []) + [p for p in pieces]:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()  # the text ends before the timings start on a shared terminal
    loops = f" | exit {s.exit_policy}, mean loops {s.mean_loops:.2f}" if s.depths else ""
    if s.drafted:
        loops += f", drafts accepted {s.accepted}/{s.drafted}"
    err.print(f"[dim]{s.prompt_tokens} prompt tokens, {s.new_tokens} new ({s.finish_reason}) | "
              f"time to first token {s.prefill_s * 1000:.1f} ms | prefill {s.prefill_tok_s:.1f} tok/s | "
              f"decode {s.decode_tok_s:.1f} tok/s{loops}[/]")
    if show_depths and s.depths:
        err.print(f"[dim]loop passes per token: {' '.join(map(str, s.depths))}[/]")


@app.command()
def calibrate(
    path: Path = typer.Argument(..., help="artifact to calibrate (its edgeloop.json is updated)"),
    text_file: Path = typer.Option(..., "--text", "-f", help="held-out UTF-8 text (not the training text)"),
    max_kl: Optional[float] = typer.Option(None, help="mean KL(full depth || early exit) at most this"),
    min_top1: Optional[float] = typer.Option(None, help="top-1 agreement with full depth at least this"),
    max_ppl_increase: Optional[float] = typer.Option(None, help="perplexity at most this much higher (0.01 = +1%)"),
    policy: str = typer.Option("auto", help="confidence | entropy | kl | agreement | gate | auto (every one, keep "
                                            "the fewest loops)"),
    kv_strategy: str = typer.Option("fill", help="what the depths a token skipped hold: fill (its exit state "
                                                 "copied forward) | recursion (nothing; deeper depths see only "
                                                 "positions that reached them)"),
    tokens: int = typer.Option(4096, help="tokens of the text to use"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Pick the early-exit policy and threshold that meet a quality target, and store it in the artifact."""
    import edgeloop
    from edgeloop.fileio import read_text
    from edgeloop.runtimes.calibrate import Target, calibrate as run_calibrate, store
    from edgeloop.runtimes.exits import KV_STRATEGIES

    if max_kl is None and min_top1 is None and max_ppl_increase is None:
        raise EdgeloopError("give a quality target: --max-kl, --min-top1 and/or --max-ppl-increase")
    for name, value, low, high in (("--max-kl", max_kl, 0, 100), ("--min-top1", min_top1, 0, 1),
                                   ("--max-ppl-increase", max_ppl_increase, 0, 100)):
        if value is not None and not low <= value <= high:
            raise EdgeloopError(f"{name} must be in [{low}, {high}], got {value}")
    if kv_strategy not in KV_STRATEGIES:
        raise EdgeloopError(f"--kv-strategy must be one of {', '.join(KV_STRATEGIES)}, got {kv_strategy!r}")
    kinds = ["confidence", "entropy", "kl", "agreement", "gate"] if policy == "auto" else [policy]
    for kind in kinds:
        if kind not in ("confidence", "entropy", "kl", "agreement", "gate"):
            raise EdgeloopError(f"--policy must be confidence, entropy, kl, agreement, gate or auto, got {policy!r}")
    if tokens < 64:
        raise EdgeloopError(f"--tokens must be at least 64, got {tokens}")
    text = read_text(text_file, "calibration text")
    model = edgeloop.load(path)
    if model.contract is None:
        raise EdgeloopError(f"{path} is a model directory; calibrate a compiled artifact")
    ids = np.asarray(model.tokenizer.encode(text)[:tokens], np.int64)
    target = Target(max_kl, min_top1, max_ppl_increase)
    result = run_calibrate(model, ids, target, policies=kinds, strategy=kv_strategy,
                           progress=None if as_json else lambda m: err.print(f"[dim]{_escape(m)}[/]"))
    store(path, result, kv_strategy, str(text_file))
    if as_json:
        out.print_json(json.dumps(result))
        return
    m = result["measured"]
    if m is None:
        out.print(f"no exit policy met {result['target']} with fewer loops: kept full depth (exit none)")
    else:
        out.print(f"exit {result['policy']} ({kv_strategy}): {m['mean_loops']} loops of {model.backend.loops} per "
                  f"token, mean KL {m['mean_kl']}, top-1 {m['top1_agreement']}, perplexity {m['perplexity']} "
                  f"(full depth {m['perplexity_full']}); stored in {path}/edgeloop.json")


@app.command()
def serve(
    path: Path = typer.Argument(..., help="artifact to serve"),
    host: str = typer.Option("127.0.0.1", help="address to bind (localhost by default)"),
    port: int = typer.Option(8000, help="TCP port"),
    max_rows: int = typer.Option(8, help="requests running at once (rows of the shared block)"),
    max_queue: int = typer.Option(64, help="requests waiting at most; more get HTTP 429"),
    scheduler: str = typer.Option("depth", help="depth (continuous depth-wise batching) | sequence (baseline)"),
    model_name: Optional[str] = typer.Option(None, help="the model id clients send (default: the directory name)"),
    threads: Optional[int] = typer.Option(None, help="intra-op threads"),
) -> None:
    """An OpenAI-compatible HTTP server (completions, chat, streaming) over the scheduling engine."""
    from edgeloop.runtimes.server import serve as run_server

    if not 0 < port < 65536:
        raise EdgeloopError(f"--port must be in 1..65535, got {port}")
    if max_rows < 1 or max_queue < 1:
        raise EdgeloopError("--max-rows and --max-queue must be >= 1")
    if scheduler not in ("depth", "sequence"):
        raise EdgeloopError(f"--scheduler must be depth or sequence, got {scheduler!r}")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise EdgeloopError("edgeloop serve needs FastAPI and uvicorn: pip install 'edgeloop[serve]'") from None
    run_server(str(path), host=host, port=port, max_rows=max_rows, max_queue=max_queue, scheduler=scheduler,
               model_name=model_name, threads=threads)


@app.command()
def chat(
    path: Path = typer.Argument(..., help="artifact (or model dir)"),
    system: Optional[str] = typer.Option(None, help="system prompt"),
    max_new_tokens: int = typer.Option(256, help="tokens per reply"),
    temperature: Optional[float] = typer.Option(None, help="0 = greedy"),
    top_p: Optional[float] = typer.Option(None, help="nucleus sampling mass"),
    repetition_penalty: Optional[float] = typer.Option(None, help="> 1 discourages repeats"),
    seed: Optional[int] = typer.Option(None, help="RNG seed"),
) -> None:
    """Interactive chat with the model's chat template; the KV cache is reused across turns."""
    import edgeloop

    model = edgeloop.load(path)
    session = model.chat(system, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                         repetition_penalty=repetition_penalty, seed=seed)
    if model.tokenizer.chat_template is None:
        err.print("[dim]no chat template in the tokenizer config: using a plain 'User:/Assistant:' transcript[/]")
    err.print("[dim]empty line or Ctrl-D to quit[/]")
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        except UnicodeDecodeError:
            raise EdgeloopError("the input is not valid UTF-8 text") from None
        if not line.strip():
            break
        for piece in session.send_stream(line):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        s = model.last_stats
        err.print(f"[dim]{s.new_tokens} tokens, first after {s.prefill_s * 1000:.0f} ms, "
                  f"{s.decode_tok_s:.1f} tok/s, {session.state.length} in cache[/]")


@app.command()
def perplexity(
    path: Path = typer.Argument(..., help="artifact, model dir or HF checkpoint"),
    text_file: Path = typer.Option(..., "--text-file", "-f", help="UTF-8 text to score"),
    window: Optional[int] = typer.Option(None, help="tokens per scoring window (default: the context)"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Perplexity of a text file (non-overlapping windows)."""
    import time

    import edgeloop
    from edgeloop.fileio import read_text

    if window is not None and window < 1:
        raise EdgeloopError(f"--window must be a positive number of tokens, got {window}")
    text = read_text(text_file, "text file")
    model = edgeloop.load(path)
    start = time.perf_counter()
    ppl = model.perplexity(text, window=window)
    tokens = len(model.tokenizer.encode(text))
    result = {"path": str(path), "text_file": str(text_file), "tokens": tokens, "perplexity": round(ppl, 4),
              "seconds": round(time.perf_counter() - start, 2)}
    if as_json:
        out.print_json(json.dumps(result))
    else:
        out.print(f"perplexity {ppl:.3f} over {tokens} tokens ({result['seconds']} s)")


def _positive_ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(c) for c in text.split(",") if c.strip())
    except ValueError:
        raise EdgeloopError(f"{flag} must be comma-separated positive integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise EdgeloopError(f"{flag} must be comma-separated positive integers, got {text!r}")
    return values


def _writable_file(path: Path, flag: str) -> None:
    """Checked before minutes of measuring, not after."""
    import os

    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir() or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise EdgeloopError(f"{flag} {path}: cannot write a file there")


@app.command()
def bench(
    paths: List[Path] = typer.Argument(..., help="artifacts and/or model dirs (PyTorch reference), measured together"),
    prefill_tokens: int = typer.Option(128, help="prompt length for the prefill latency"),
    contexts: str = typer.Option("128,1024", help="comma-separated contexts for decode tok/s"),
    decode_steps: int = typer.Option(32, help="decode steps timed per measurement"),
    rounds: int = typer.Option(3, help="interleaved rounds (min/median/max over them)"),
    batch: str = typer.Option("1", help="comma-separated batch sizes: aggregate decode tok/s of that many "
                                       "sequences stepping together (at the first context)"),
    threads: Optional[int] = typer.Option(None, help="intra-op threads (default: all cores)"),
    rss: bool = typer.Option(True, help="measure peak RSS per model in a subprocess"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="write decode tok/s vs context as a PNG"),
) -> None:
    """Prefill latency, decode tok/s (single and batched) and peak RSS, models interleaved in one run."""
    from edgeloop.runtimes.bench import BenchConfig, plot, run_bench, to_json

    ctx = _positive_ints(contexts, "--contexts")
    batches = _positive_ints(batch, "--batch")
    for flag, value in (("--prefill-tokens", prefill_tokens), ("--decode-steps", decode_steps), ("--rounds", rounds)):
        if value < 1:
            raise EdgeloopError(f"{flag} must be >= 1, got {value}")
    if threads is not None and threads < 1:
        raise EdgeloopError(f"--threads must be >= 1, got {threads}")
    if plot_path:
        _writable_file(plot_path, "--plot")
    config = BenchConfig(prefill_tokens=prefill_tokens, contexts=ctx, decode_steps=decode_steps, rounds=rounds,
                         threads=threads, rss=rss, batches=batches)
    names = _unique_names(paths)
    results = run_bench([str(p) for p in paths], config, names,
                        progress=None if as_json else lambda r: err.print(f"[dim]round {r}/{rounds} done[/]"))
    if plot_path:
        plot(results, plot_path)
    if as_json:
        out.print_json(to_json(results, config))
        return
    table = Table(title=f"prefill {prefill_tokens} tokens, decode {decode_steps} steps, {rounds} rounds (median)")
    batch_cols = [b for b in batches if b > 1]
    for col in (["model", "backend", "prefill ms"] + [f"decode tok/s @{c}" for c in ctx]
                + [f"batch {b} tok/s @{ctx[0]}" for b in batch_cols] + ["peak RSS MB", "disk MB"]):
        table.add_column(col, justify="left" if col in ("model", "backend") else "right")
    for r in results:
        table.add_row(_escape(r.name), r.backend, f"{statistics.median(r.prefill_ms):.1f}",
                      *[f"{statistics.median(r.decode_tok_s[c]):.1f}" for c in ctx],
                      *[f"{statistics.median(r.batch_tok_s[b]):.1f}" for b in batch_cols],
                      f"{r.peak_rss_mb}" if r.peak_rss_mb is not None else "-", f"{r.bytes_on_disk / 1e6:.1f}")
    out.print(table)


def _unique_names(paths: List[Path]) -> list[str]:
    names = [p.name for p in paths]
    return [str(p) if names.count(p.name) > 1 else p.name for p in paths]
