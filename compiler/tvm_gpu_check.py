"""Launch configuration of every GPU kernel of a build, read from the scheduled TIR (no GPU needed).

A kernel's grid and block are the extents of the loops bound to ``blockIdx.x/y/z`` and
``threadIdx.x/y/z``. They are read after scheduling (our dense schedules and dlight's rules),
where a launch is the outermost loop nest bound to a thread axis: a PrimFunc may hold several
launches (TVM's KV-cache kernels do); ours hold one. Extents that depend on the sequence length
(prefill) are kept as expressions (``"(s + 31) // 32"``).

`launch_table` is recorded in the manifest (``kernels_launch``) and `underspread` is what the
tests assert on: a matmul-like decode kernel that launches fewer thread blocks than the GPU has
SMs leaves most of the GPU idle (the gate/up GEMV that ran as one block took 97.9% of decode).
"""

from __future__ import annotations

import re

import tvm
from tvm import s_tir, tirx

AXES = ("x", "y", "z")


def _value(extent):
    if isinstance(extent, tirx.IntImm):
        return int(extent)
    return re.sub(r"T\.int(?:32|64)\((-?\d+)\)", r"\1", str(extent))  # "(s + 31) // 32"


def _children(node) -> list:
    """Sub-statements of a scheduled-TIR statement (whatever its class in this TVM version)."""
    if isinstance(node, tirx.SeqStmt):
        return list(node.seq)
    if isinstance(node, s_tir.SBlockRealize):
        return [node.block]
    if isinstance(node, s_tir.SBlock):
        return [c for c in (node.init, node.body) if c is not None]
    if isinstance(node, tirx.IfThenElse):
        return [c for c in (node.then_case, node.else_case) if c is not None]
    body = getattr(node, "body", None)
    return [body] if isinstance(body, tirx.Stmt) else []


def _bound_tag(node) -> str | None:
    if isinstance(node, tirx.For) and node.thread_binding is not None:
        return str(node.thread_binding.thread_tag)
    if isinstance(node, tirx.AttrStmt) and node.attr_key == "thread_extent":
        return str(node.node.thread_tag)
    return None


def _extent_of(node):
    return node.extent if isinstance(node, tirx.For) else node.value


def _collect(node, dims: dict) -> None:
    """Record every thread-axis extent inside one launch (the largest if a nest repeats a tag)."""
    tag = _bound_tag(node)
    if tag is not None:
        value = _value(_extent_of(node))
        old = dims.get(tag)
        if old is None or (isinstance(old, int) and isinstance(value, int) and value > old):
            dims[tag] = value
    for child in _children(node):
        _collect(child, dims)


def _launches(node, out: list) -> None:
    if _bound_tag(node) is not None:
        dims: dict = {}
        _collect(node, dims)
        out.append({"grid": [dims.get(f"blockIdx.{a}", 1) for a in AXES],
                    "block": [dims.get(f"threadIdx.{a}", 1) for a in AXES]})
        return
    for child in _children(node):
        _launches(child, out)


def kernel_launches(func: tirx.PrimFunc) -> list[dict]:
    """Every launch of one scheduled PrimFunc: [{"grid": [x, y, z], "block": [x, y, z]}]."""
    out: list[dict] = []
    _launches(func.body, out)
    return out


def launch_table(mod: tvm.IRModule) -> dict[str, dict]:
    """kernel name -> {"grid", "block"} (plus "launches": n when a kernel launches several times:
    the first is shown) for every PrimFunc of `mod` with a GPU launch."""
    table = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        launches = kernel_launches(func)
        if launches:
            entry = dict(launches[0])
            if len(launches) > 1:
                entry["launches"] = len(launches)
            table[gv.name_hint] = entry
    return dict(sorted(table.items()))


def blocks(entry: dict) -> int | None:
    """Thread blocks of a launch, None if the grid depends on the sequence length."""
    total = 1
    for g in entry["grid"]:
        if not isinstance(g, int):
            return None
        total *= g
    return total


def required_blocks(columns: int, sm_count: int) -> int:
    """The spread a decode GEMV with `columns` outputs must reach: one block per column when it has
    fewer columns than SMs (a LoRA-A product), every SM otherwise, two per SM for big ones (>= 8
    columns per SM) so that memory latency is hidden."""
    if columns < sm_count:
        return columns
    return 2 * sm_count if columns >= 8 * sm_count else sm_count


def underspread(table: dict[str, dict], dense: dict[str, dict], sm_count: int) -> list[str]:
    """One line per single-row (decode, last-token head) dense kernel that launches too few blocks."""
    problems = []
    for name, info in sorted(dense.items()):
        if not info["single"] or name not in table:
            continue
        need, got = required_blocks(info["columns"], sm_count), blocks(table[name])
        if got is None or got < need:
            problems.append(f"{name}: {got} blocks for {info['columns']} columns, need >= {need} "
                            f"({sm_count} SMs)")
    return problems
