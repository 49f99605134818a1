"""Artifact directories: the backend's files, the tokenizer, and the contract (`edgeloop.json`).

Layout (DESIGN.md section 2)::

    ARTIFACT/
      edgeloop.json        the contract (runtimes/contract.py): entry points, KV layout, loop state,
                           tokenizer and generation defaults, sha256 of every file, its own digest
      model.onnx ...       backend files (named by the contract's entry points and sections)
      tokenizer.json       (and chat_template.jinja when the model has a chat template)

Written into a temporary directory and renamed at the end: never half an artifact.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from edgeloop.errors import EdgeloopError
from edgeloop.fileio import atomic_output_dir, sha256_file
from edgeloop.runtimes.contract import (FORMAT, MANIFEST, VERSION, Contract, EntryPoint, FileEntry, KVLayout,
                                        LoopState, OnnxSection, TokenizerSection, TvmSection, parse,
                                        serialize)
from edgeloop.runtimes.sampling import generation_defaults_from
from edgeloop.runtimes.tokenizer import resolve_tokenizer

TEMPLATE_FILE = "chat_template.jinja"


@dataclass
class BackendResult:
    """What a backend builder returns: its sections of the contract."""

    layout: str
    loop: LoopState
    kv: KVLayout
    entry_points: dict[str, EntryPoint]
    onnx: OnnxSection | None = None
    tvm: TvmSection | None = None
    quantization: dict | None = None
    quality: dict | None = None
    graph: dict | None = None
    kernels: tuple[str, ...] = ()


def has_host_loop(recursion) -> bool:
    """The host-driven loop (prologue / block / epilogue) exists for a single looped stage."""
    return len(recursion.stages) == 1


def loop_state(model) -> LoopState:
    rec = model.recursion
    return LoopState(loops=rec.loops, blocks_per_loop=rec.shared_per_loop, sharing=rec.sharing, stages=rec.stages,
                     num_depths=rec.num_depths, host_loop=has_host_loop(rec), loop_norm=model.spec.loop_norm)


def _tokenizer(model) -> tuple[TokenizerSection, str | None]:
    section, template = resolve_tokenizer(model.path, model.generation, model.spec.vocab_size)
    if template is not None:
        section = replace(section, chat_template=TEMPLATE_FILE)
    return section, template


def provisional_contract(model, options, result: BackendResult, tokenizer: TokenizerSection | None = None,
                         files: dict[str, FileEntry] | None = None) -> Contract:
    """The contract of an artifact being built (no files yet): for the compiler's own runs of it."""
    import edgeloop

    return Contract(
        format=FORMAT, version=VERSION, edgeloop_version=edgeloop.__version__, backend=options.backend,
        target=options.target, layout=result.layout, model=model.spec, recursion=model.recursion, loop=result.loop,
        kv=result.kv, entry_points=result.entry_points,
        tokenizer=tokenizer or _tokenizer(model)[0], generation=generation_defaults_from(model.generation),
        files=files or {}, onnx=result.onnx, tvm=result.tvm, quantization=result.quantization,
        quality=result.quality, graph=result.graph, kernels=tuple(result.kernels), options=options.to_dict(),
        exit=_exit_section(model, options, result))


def _exit_section(model, options, result: BackendResult):
    """--exit: the artifact's default policy, validated against the model (a gate needs a gate)."""
    from edgeloop.runtimes.contract import ExitSection
    from edgeloop.runtimes.exits import parse_policy

    spec = model.spec
    if not options.exit and spec.exit_gate and spec.exit_threshold is not None and spec.exit_threshold < 1:
        return ExitSection(f"gate:{spec.exit_threshold:g}", "fill", {"source": "the checkpoint's own exit threshold"})
    if not options.exit or options.exit == "none":
        return None
    if not result.loop.host_loop:
        raise EdgeloopError("--exit needs a model with one looped stage (CYCLE sharing): this one has "
                            f"{len(model.recursion.stages)} stages")
    policy = parse_policy(options.exit, loops=model.recursion.loops, gate=model.spec.exit_gate,
                          gate_threshold=model.spec.exit_threshold)
    return ExitSection(str(policy), "fill", None)


def write_artifact(out: Path, model, options, build, *, overwrite: bool = False) -> Contract:
    """Run `build(model, options, tmpdir) -> BackendResult` and finish the artifact."""
    inputs = (model.path,) + ((Path(options.calibration_text),) if options.calibration_text else ())
    with atomic_output_dir(out, overwrite=overwrite, inputs=inputs) as tmp:
        tokenizer, template = _tokenizer(model)  # validated before any graph is built
        result = build(model, options, tmp)
        if tokenizer.file:
            shutil.copy2(Path(model.path) / tokenizer.file, tmp / tokenizer.file)
        if template is not None:
            (tmp / TEMPLATE_FILE).write_text(template, encoding="utf-8")
        files = {p.name: FileEntry(sha256_file(p), p.stat().st_size) for p in sorted(tmp.iterdir()) if p.is_file()}
        raw = serialize(provisional_contract(model, options, result, tokenizer, files))
        (tmp / MANIFEST).write_bytes(raw)
    return parse(raw, str(Path(out) / MANIFEST))
