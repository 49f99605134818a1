"""The `edgeloop` command line. Flags map 1:1 onto the option dataclasses.

User errors (EdgeloopError) print one line on stderr and exit with code 2; nothing else is
caught, so bugs keep their traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from edgeloop.errors import EdgeloopError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Convert, compile and run Relaxed Recursive Transformers.")
err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def main() -> None:
    try:
        app()
    except EdgeloopError as e:
        err.print(f"[bold red]error:[/] {e}", soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


# ---------------------------------------------------------------------------------------------
# convert


@app.command()
def convert(
    hf_dir: Path = typer.Argument(..., help="Hugging Face checkpoint directory"),
    output: Path = typer.Option(..., "-o", "--output", help="output model directory (written atomically)"),
    loops: int = typer.Option(1, "--loops", "-B", help="B: times the shared block runs (1 = keep the vanilla model)"),
    sharing: str = typer.Option("cycle", help="cycle | sequence | middle-cycle"),
    init: str = typer.Option("average", help="stepwise | average | lower"),
    lora_rank: str = typer.Option("0", help="per-depth LoRA rank: N, 'full' or 0 (strict recursion)"),
    lora_rank_attn: Optional[str] = typer.Option(None, help="rank for q/k/v/o (overrides --lora-rank)"),
    lora_rank_mlp: Optional[str] = typer.Option(None, help="rank for gate/up/down (overrides --lora-rank)"),
    share_norms: Optional[bool] = typer.Option(None, "--share-norms/--per-depth-norms",
                                               help="tie norm weights and biases to the block as the paper did "
                                                    "(default: per depth when LoRA is on)"),
    svd_dtype: str = typer.Option("float32", help="float32 | float64 precision of the SVD"),
    svd: str = typer.Option("auto", help="auto | exact | randomized truncated SVD (auto: randomized for "
                                         "rank <= side/8 on sides >= 1024, 40x faster, within 0.2% of optimal)"),
    force: bool = typer.Option(False, "--force", help="replace an existing output directory"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Turn a Hugging Face checkpoint into a recursive model with per-depth LoRA."""
    from edgeloop.converter import ConvertOptions, convert as run_convert
    from edgeloop.params import human

    options = ConvertOptions(loops=loops, sharing=sharing, init=init, lora_rank=lora_rank,
                             lora_rank_attn=lora_rank_attn, lora_rank_mlp=lora_rank_mlp,
                             share_norms=share_norms, svd_dtype=svd_dtype, svd=svd)
    if not as_json:
        err.print(f"[dim]convert {hf_dir} -> {output}: {options}[/]")
    result = run_convert(hf_dir, output, options, overwrite=force, progress=not as_json)
    p, rec = result.params, result.recursion
    summary = {"output": str(result.path), "family": result.spec.family, "layers": result.spec.num_layers,
               "unique_blocks": rec.num_blocks, "loops": rec.loops, "sharing": rec.sharing, "init": rec.init,
               "lora_ranks": rec.lora_ranks, "per_depth_vectors": rec.per_depth_vectors, "params": p.to_dict(),
               "notes": result.notes}
    if as_json:
        out.print_json(json.dumps(summary))
        return
    table = Table(title=f"{result.spec.family}: {result.spec.num_layers} layers -> "
                        f"{rec.num_blocks} unique blocks ({rec.sharing}, B={rec.loops}, {rec.init} init)")
    table.add_column("parameters")
    table.add_column("count", justify="right")
    for label, value in (("embedding + head", p.embedding), ("shared (non-embedding)", p.shared),
                         ("LoRA", p.lora), ("per-depth norms/biases", p.per_depth_vectors),
                         ("total", p.total), ("original total", p.original_total)):
        table.add_row(label, human(value))
    table.add_row("compression vs original", f"{p.compression:.2f}x")
    out.print(table)
    for note in result.notes:
        err.print(f"[yellow]note:[/] {note}")


@app.command("export-merged")
def export_merged_cmd(
    model_dir: Path = typer.Argument(..., help="edgeloop model dir"),
    output: Path = typer.Option(..., "-o", "--output", help="HF checkpoint directory to write"),
    dtype: str = typer.Option("float32", help="float32 | float16"),
    force: bool = typer.Option(False, "--force", help="replace an existing output directory"),
) -> None:
    """Write the equivalent vanilla HF checkpoint (every depth's LoRA merged into its own layer)."""
    from edgeloop.export import export_merged

    path = export_merged(model_dir, output, dtype=dtype, overwrite=force)
    out.print(f"wrote {path}: a plain Hugging Face checkpoint with the recursion unrolled and LoRA merged")


# ---------------------------------------------------------------------------------------------
# compile


@app.command("compile")
def compile_cmd(
    model_dir: Path = typer.Argument(..., help="edgeloop model dir (or a HF checkpoint, compiled as B = 1)"),
    output: Path = typer.Option(..., "-o", "--output", help="artifact directory (written atomically)"),
    backend: str = typer.Option("onnxruntime", help="onnxruntime | tvm"),
    target: str = typer.Option("cpu", help="onnxruntime: cpu | cuda | mobile; tvm: cpu | cuda | android-cpu | "
                                           "android-opencl | ios-metal | webgpu"),
    layout: str = typer.Option("auto", help="auto (the faster per backend: unrolled on onnxruntime) | loop "
                                            "(shared block once, inside a Loop) | unrolled"),
    quant: str = typer.Option("none", help="none | int8 | int4 (shared block weights)"),
    block_size: int = typer.Option(32, help="int4 block size: 32 | 64 | 128"),
    symmetric: bool = typer.Option(True, "--symmetric/--asymmetric", help="int4 without (default) or with zero points"),
    quantize_embeddings: bool = typer.Option(False, help="also quantize the embedding and LM head"),
    keep_float: Optional[List[str]] = typer.Option(None, help="glob of weights to keep float (repeatable)"),
    lora_dtype: str = typer.Option("float32", help="LoRA storage: float32 | float16 | int8 (8-bit MatMulNBits; unrolled ORT only)"),
    scale_search: bool = typer.Option(True, help="int4: search per-block scales (off: round-to-nearest)"),
    accuracy_level: int = typer.Option(4, help="MatMulNBits compute: 4 = int8 activations (fast), 0 = fp32"),
    calibration_text: Optional[Path] = typer.Option(None, help="held-out text for the quality report"),
    optimize: bool = typer.Option(True, help="apply portable ORT graph optimizations at compile time"),
    tune_trials: int = typer.Option(0, help="TVM: offline tuning trials (0 = tuning-free schedules)"),
    debug_dump: bool = typer.Option(False, help="write the graph after each pipeline step to debug/"),
    arch: Optional[List[str]] = typer.Option(None, help="TVM CUDA: architecture(s) to build device code for, "
                                                        "repeatable or comma-separated (default sm_80,sm_90)"),
    dtype: str = typer.Option("float32", help="TVM CUDA: float32 | float16 (weights, activations, KV cache; "
                                              "float32 accumulation)"),
    force: bool = typer.Option(False, "--force", help="replace an existing artifact"),
    as_json: bool = typer.Option(False, "--json", help="print the manifest summary as JSON"),
) -> None:
    """Compile a model into a runnable artifact (ONNX Runtime or TVM)."""
    from edgeloop.compiler import CompileOptions, compile_model
    from edgeloop.params import human_bytes

    options = CompileOptions(backend=backend, target=target, layout=layout, quant=quant, block_size=block_size,
                             symmetric=symmetric, quantize_embeddings=quantize_embeddings,
                             keep_float=list(keep_float or []), lora_dtype=lora_dtype, scale_search=scale_search,
                             accuracy_level=accuracy_level,
                             calibration_text=str(calibration_text) if calibration_text else None, optimize=optimize,
                             tune_trials=tune_trials, debug_dump=debug_dump, arch=list(arch or []),
                             dtype=dtype)
    options.validate()
    if not as_json:
        err.print(f"[dim]compile {model_dir} -> {output}: {options}[/]")
    manifest = compile_model(model_dir, output, options, overwrite=force)
    summary = {"output": str(output), "backend": backend, "target": target, "layout": manifest.get("layout"),
               "bytes": sum(f["bytes"] for f in manifest["files"].values()),
               "graph": manifest.get("graph"), "quantization": manifest.get("quantization"),
               "quality": manifest.get("quality"), "cuda": manifest.get("cuda")}
    if as_json:
        out.print_json(json.dumps(summary, default=str))
        return
    out.print(f"[bold]{output}[/]: {backend}/{target}, layout {summary['layout']}, {human_bytes(summary['bytes'])}")
    graph = manifest.get("graph") or {}
    if graph:
        out.print(f"  main graph {graph.get('main_nodes')} nodes, {graph.get('loops')} Loop(s) with "
                  f"{graph.get('loop_body_nodes')} body nodes, {graph.get('initializers')} initializers")
        out.print("  bytes: " + ", ".join(f"{k} {human_bytes(v)}" for k, v in graph.get("bytes_by_kind", {}).items()))
    quality = manifest.get("quality")
    if quality:
        out.print("  quality vs fp32: " + ", ".join(f"{k} {v}" for k, v in quality.items()))
    cuda = manifest.get("cuda")
    if cuda:
        out.print(f"  CUDA device code: {cuda['device_code']} for {', '.join(cuda['archs'])}"
                  + (f" + PTX {', '.join(cuda['ptx'])}" if cuda.get("ptx") else ""))


# ---------------------------------------------------------------------------------------------
# inspect


@app.command()
def inspect(path: Path = typer.Argument(..., help="model dir, HF checkpoint or artifact"),
            as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Show what a model directory or artifact contains."""
    from edgeloop.inspection import inspect_path

    info = inspect_path(path)
    if as_json:
        out.print_json(json.dumps(info, default=str))
        return
    _print_info(info)


def _print_info(info: dict, indent: str = "") -> None:
    from edgeloop.params import human, human_bytes

    for key, value in info.items():
        if isinstance(value, dict):
            out.print(f"{indent}[bold]{key}[/]:")
            _print_info(value, indent + "  ")
        elif isinstance(value, int) and not isinstance(value, bool) and (key.endswith("bytes") or indent and key.endswith((".onnx", ".safetensors", ".json", ".ort", ".data", ".tar"))):
            out.print(f"{indent}{key}: {human_bytes(value)}")
        elif isinstance(value, int) and not isinstance(value, bool) and value >= 10_000:
            out.print(f"{indent}{key}: {human(value)} ({value:,})")
        else:
            out.print(f"{indent}{key}: {value}")


# ---------------------------------------------------------------------------------------------
# run


def _generation_options(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop,
                        truncate) -> dict:
    return {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p,
            "min_p": min_p, "repetition_penalty": repetition_penalty, "seed": seed, "stop": list(stop or []),
            "truncate": truncate}


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
    seed: Optional[int] = typer.Option(None, help="RNG seed for reproducible sampling"),
    stop: Optional[List[str]] = typer.Option(None, help="stop string (repeatable)"),
    truncate: bool = typer.Option(False, help="keep the end of a prompt longer than the context"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object (text + timings) instead of streaming"),
) -> None:
    """Generate text, streaming it to stdout; timings go to stderr."""
    import edgeloop

    model = edgeloop.load(path)
    options = _generation_options(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop,
                                  truncate)
    config = model.generation_config(**options)
    if as_json:
        text = "".join(model.stream(prompt, config=config))
        out.print_json(json.dumps({"prompt": prompt, "text": text, "stats": model.last_stats.to_dict()}))
        return
    sys.stdout.write(prompt)
    for piece in model.stream(prompt, config=config):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()  # the text ends before the timings start on a shared terminal
    s = model.last_stats
    err.print(f"[dim]{s.prompt_tokens} prompt tokens, {s.new_tokens} new ({s.finish_reason}) | "
              f"time to first token {s.prefill_s * 1000:.1f} ms | prefill {s.prefill_tok_s:.1f} tok/s | "
              f"decode {s.decode_tok_s:.1f} tok/s[/]")


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

    if not text_file.is_file():
        raise EdgeloopError(f"text file not found: {text_file}")
    text = text_file.read_text(encoding="utf-8")
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


@app.command()
def bench(
    paths: List[Path] = typer.Argument(..., help="artifacts and/or model dirs (PyTorch reference), measured together"),
    prefill_tokens: int = typer.Option(128, help="prompt length for the prefill latency"),
    contexts: str = typer.Option("128,1024", help="comma-separated contexts for decode tok/s"),
    decode_steps: int = typer.Option(32, help="decode steps timed per measurement"),
    rounds: int = typer.Option(3, help="interleaved rounds (min/median/max over them)"),
    threads: Optional[int] = typer.Option(None, help="intra-op threads (default: all cores)"),
    rss: bool = typer.Option(True, help="measure peak RSS per model in a subprocess"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="write decode tok/s vs context as a PNG"),
) -> None:
    """Prefill latency, decode tok/s and peak RSS, several models interleaved in one run."""
    from edgeloop.runtimes.bench import BenchConfig, plot, run_bench, to_json

    try:
        ctx = tuple(int(c) for c in contexts.split(",") if c.strip())
    except ValueError:
        raise EdgeloopError(f"--contexts must be comma-separated integers, got {contexts!r}") from None
    config = BenchConfig(prefill_tokens=prefill_tokens, contexts=ctx, decode_steps=decode_steps, rounds=rounds,
                         threads=threads, rss=rss)
    names = _unique_names(paths)
    results = run_bench([str(p) for p in paths], config, names,
                        progress=None if as_json else lambda r: err.print(f"[dim]round {r}/{rounds} done[/]"))
    if plot_path:
        plot(results, plot_path)
    if as_json:
        out.print_json(to_json(results, config))
        return
    table = Table(title=f"prefill {prefill_tokens} tokens, decode {decode_steps} steps, {rounds} rounds (median)")
    for col in ["model", "backend", "prefill ms"] + [f"decode tok/s @{c}" for c in ctx] + ["peak RSS MB", "disk MB"]:
        table.add_column(col, justify="left" if col in ("model", "backend") else "right")
    import statistics

    for r in results:
        table.add_row(r.name, r.backend, f"{statistics.median(r.prefill_ms):.1f}",
                      *[f"{statistics.median(r.decode_tok_s[c]):.1f}" for c in ctx],
                      f"{r.peak_rss_mb}" if r.peak_rss_mb is not None else "-", f"{r.bytes_on_disk / 1e6:.1f}")
    out.print(table)


def _unique_names(paths: List[Path]) -> list[str]:
    names = [p.name for p in paths]
    return [str(p) if names.count(p.name) > 1 else p.name for p in paths]


if __name__ == "__main__":
    main()
