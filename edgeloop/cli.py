"""The `edgeloop` command line. Flags map 1:1 onto the option dataclasses.

User errors (EdgeloopError, and usage errors such as a wrong flag type) print one line on
stderr and exit with code 2; nothing else is caught, so bugs keep their traceback. The
running commands (run, chat, perplexity, bench, ...) live in `cli_run`.
"""

from __future__ import annotations

import json
from dataclasses import asdict
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


def fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", soft_wrap=True, markup=True, highlight=False)
    sys.exit(2)


def main() -> None:
    from typer._click import exceptions as click_errors

    try:
        app(standalone_mode=False)
    except EdgeloopError as e:
        fail(_escape(str(e)))
    except click_errors.NoArgsIsHelpError:
        sys.exit(0)  # the help was printed
    except click_errors.ClickException as e:  # a wrong flag, a missing argument: one line, not typer's box
        where = f" (see 'edgeloop {e.ctx.info_name} --help')" if getattr(e, "ctx", None) and e.ctx.parent else \
            " (see 'edgeloop --help')"
        fail(_escape(e.format_message()) + where)
    except click_errors.Exit as e:
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, click_errors.Abort):
        err.print("interrupted")
        sys.exit(130)
    except BrokenPipeError:  # `edgeloop run ... | head`
        sys.exit(0)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text.replace("\n", " "))


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
        err.print(f"[yellow]note:[/] {_escape(note)}")
    err.print(f"[dim]{_escape(str(options))}[/]", soft_wrap=True)


@app.command()
def uptrain(
    model_dir: Path = typer.Argument(..., help="edgeloop model dir (converted, one looped stage)"),
    data: List[Path] = typer.Option(..., "--data", help="UTF-8 training text (repeatable)"),
    output: Path = typer.Option(..., "-o", "--output", help="output model directory (written atomically)"),
    teacher: Optional[Path] = typer.Option(None, help="the original HF checkpoint (default: the one the model was "
                                                      "converted from)"),
    steps: int = typer.Option(200, help="optimizer steps"),
    lr: float = typer.Option(1e-3, help="peak AdamW learning rate (5% warm-up, cosine decay to a tenth)"),
    batch: int = typer.Option(8, help="windows per step"),
    seq: int = typer.Option(128, help="tokens per window"),
    exit_loss: float = typer.Option(1.0, help="loss weight of the intermediate loop boundaries (the last weighs 1)"),
    exit_gate: bool = typer.Option(False, "--exit-gate", help="also train a learned exit gate (policy gate:T)"),
    train_shared: bool = typer.Option(False, "--train-shared", help="also train the shared block"),
    device: str = typer.Option("auto", help="auto (CUDA when torch sees one) | cpu | cuda"),
    seed: int = typer.Option(0, help="RNG seed (batches, init)"),
    checkpoint_every: int = typer.Option(100, help="steps between resumable checkpoints"),
    resume: bool = typer.Option(False, "--resume", help="continue from the last checkpoint of this output"),
    heldout: Optional[Path] = typer.Option(None, help="held-out text for the per-loop perplexity (default: the "
                                                      "model's heldout.txt)"),
    save_dtype: str = typer.Option("float32", help="float32 | float16 (half the size on disk)"),
    force: bool = typer.Option(False, "--force", help="replace an existing output directory"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Distill the original checkpoint into the recursive model, with a loss at every loop boundary."""
    from edgeloop.uptrain import UptrainOptions, uptrain as run_uptrain

    options = UptrainOptions(steps=steps, lr=lr, batch=batch, seq=seq, exit_loss=exit_loss, train_shared=train_shared,
                             exit_gate=exit_gate, device=device, seed=seed, checkpoint_every=checkpoint_every,
                             resume=resume, teacher=str(teacher) if teacher else None,
                             heldout=str(heldout) if heldout else None, save_dtype=save_dtype)
    result = run_uptrain(model_dir, list(data), output, options, overwrite=force, progress=not as_json)
    if as_json:
        out.print_json(json.dumps(result.to_dict()))
        return
    table = Table(title=f"uptrain {result.steps} steps in {result.seconds:.0f} s ({result.tokens_per_s:.0f} tok/s), "
                        f"loss {result.loss_first:.4f} -> {result.loss_last:.4f}")
    table.add_column("held-out perplexity")
    for i in range(len(result.perplexity_after)):
        table.add_column(f"loop {i + 1}", justify="right")
    table.add_row("before", *[f"{p:.2f}" for p in result.perplexity_before])
    table.add_row("after", *[f"{p:.2f}" for p in result.perplexity_after])
    out.print(table)
    out.print(f"original model: {result.teacher_perplexity:.2f}; wrote {_escape(str(result.path))}")
    for note in result.notes:
        err.print(f"[yellow]note:[/] {_escape(note)}")


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
    target: str = typer.Option("cpu", help="onnxruntime: cpu | cuda | mobile; tvm: cpu | cuda | android-cpu | ios-cpu | "
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
    debug_dump: Optional[Path] = typer.Option(None, help="write the graph after every pipeline pass into this "
                                                           "directory (one file per graph and pass)"),
    arch: Optional[List[str]] = typer.Option(None, help="TVM CUDA: architecture(s) to build device code for, "
                                                        "repeatable or comma-separated (default sm_80,sm_90)"),
    dtype: str = typer.Option("float32", help="TVM CUDA: float32 | float16 (weights, activations, KV cache; "
                                              "float32 accumulation)"),
    exit_policy: Optional[str] = typer.Option(None, "--exit", help="default early-exit policy stored in the "
                                              "artifact (e.g. confidence:0.9; 'edgeloop calibrate' picks one)"),
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
                             tune_trials=tune_trials, debug_dump=str(debug_dump) if debug_dump else None,
                             arch=list(arch or []), dtype=dtype, exit=exit_policy)
    options.validate()
    contract = compile_model(model_dir, output, options, overwrite=force)
    size = sum(f.bytes for f in contract.files.values())
    original = _original_bytes(model_dir)
    summary = {"output": str(output), "backend": backend, "target": target, "layout": contract.layout,
               "bytes": size, "original_checkpoint_bytes": original, "entry_points": sorted(contract.entry_points), "graph": contract.graph,
               "quantization": contract.quantization, "quality": contract.quality,
               "cuda": asdict(contract.tvm.cuda) if contract.tvm and contract.tvm.cuda else None}
    if as_json:
        out.print_json(json.dumps(summary, default=str))
        return
    out.print(f"[bold]{_escape(str(output))}[/]: {backend}/{target}, layout {contract.layout}, {human_bytes(size)}, "
              f"entry points {', '.join(sorted(contract.entry_points))}")
    if original:
        out.print(f"  {size / original:.2f}x the size of the original checkpoint ({human_bytes(original)})")
    graph = contract.graph or {}
    if backend == "onnxruntime" and graph:
        out.print(f"  main graph {graph.get('main_nodes')} nodes, {graph.get('loops')} Loop(s) with "
                  f"{graph.get('loop_body_nodes')} body nodes, {graph.get('initializers')} initializers")
        out.print("  bytes: " + ", ".join(f"{k} {human_bytes(v)}" for k, v in graph.get("bytes_by_kind", {}).items()))
    elif graph:
        out.print(f"  {graph.get('relax_functions')} Relax functions, {graph.get('tir_kernels')} kernels, "
                  f"{human_bytes(graph.get('param_bytes', 0))} of parameters, compiled in {graph.get('compile_s')} s")
    for note in (contract.quantization or {}).get("notes", []):
        err.print(f"[yellow]note:[/] {_escape(note)}")
    quality = contract.quality
    if quality:
        out.print("  quality vs fp32: " + ", ".join(f"{k} {v}" for k, v in quality.items()))
    cuda = contract.tvm.cuda if contract.tvm else None
    if cuda:
        out.print(f"  CUDA device code: {cuda.device_code} for {', '.join(cuda.archs)}"
                  + (f" + PTX {', '.join(cuda.ptx)}" if cuda.ptx else ""))
    err.print(f"[dim]{_escape(str(options))}[/]", soft_wrap=True)


def _original_bytes(model_dir: Path) -> int | None:
    """Bytes of the weights of the HF checkpoint a model dir came from, when it is still there."""
    from edgeloop.checkpoint import original_checkpoint, read_model_config

    try:
        source = read_model_config(Path(model_dir)).get("source", {})
    except EdgeloopError:
        return None
    path = original_checkpoint(Path(model_dir), source)
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) if path else None


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


import edgeloop.cli_run  # noqa: E402,F401 - registers the running commands on `app`

if __name__ == "__main__":
    main()
