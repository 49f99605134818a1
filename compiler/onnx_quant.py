"""Quantize a built ONNX graph: our own packing (quant_pack), our own node selection.

`quantize_graph` rewrites, in the main graph and in every Loop body (whose nodes read the
shared weights as outer-scope initializers):

  MatMul(x, b{u}.{group}.W)          -> MatMulNBits (block layout) or DynamicQuantizeMatMul (int8
                                        per channel), by the scheme the preset names for "shared"
  Gemm(h, head, transB=1)  (LM head) -> MatMulNBits           } with --quantize-embeddings; a tied
  Gather(embed.weight, ids)          -> GatherBlockQuantized  } embedding shares the packed codes

  MatMul(h, d{depth}.{group}.A|B.{part}) -> 8-bit MatMulNBits       with --lora-dtype int8 (unrolled)

Norms and everything else stay float (float16 LoRA storage is chosen when the graph is built).
`--keep-float` globs exclude weights by initializer name. ORT's quantizers are not
used: their node selection is unreliable on our graphs (DESIGN.md section 3).

`measure_quality` runs the quantized artifact and the fp32 graph on held-out text and reports
mean KL, top-1 agreement and perplexity of both.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeloop.compiler import quant_pack as qp
from edgeloop.errors import EdgeloopError

MS = "com.microsoft"

# --quant NAME -> scheme (quant_pack.SCHEMES) per initializer kind; kinds not listed stay float.
# int8 uses 8-bit blocks (MatMulNBits, int8 activations per block at accuracy level 4). Measured on
# the bundled model: KL 4e-6 / top-1 99.9%, decode as fast as per-channel DynamicQuantizeMatMul
# ("int8-channel": prefill ~1.8x faster, but per-tensor activations give KL 9e-5 / top-1 98.97%).
PRESETS: dict[str, dict[str, str]] = {
    "none": {},
    "int8": {"shared": "int8-block", "embedding": "int8-block"},
    "int4": {"shared": "int4-block", "embedding": "int4-block"},
}
# --lora-dtype int8: the per-depth LoRA factors, whatever --quant says about the shared weights.
# 8-bit blocks of 32 along the input (for B: the rank). Measured on the bundled model: the LoRA product
# is off by ~1.1% (x, A, xA and B all rounded), KL 1.3e-4 and top-1 98% vs fp32 with float shared
# weights; the LoRA bytes shrink 4x. Rebalancing the SVD factors before rounding did not help.
LORA_INT8 = {"lora": "int8-block"}

QUALITY_TOKENS = 2048  # held-out tokens scored when a text is available
QUALITY_WINDOW = 512  # tokens per forward pass (attention cost grows with the square)
RANDOM_TOKENS = 256  # random ids scored when no matching text exists (test models)


# ---------------------------------------------------------------------------------------------
# the rewrite


def quantize_graph(proto: onnx.ModelProto, kinds: dict[str, str], model, options, *, in_place: bool = False,
                   cache: dict | None = None):
    """-> (quantized proto, updated kinds, quantization manifest section). The proto is copied unless
    in_place (a compiler that saved the float graph already rewrites it without a second copy).
    cache: packed weights by content, shared by the graphs of one artifact — the forward graph, the
    block steps and kv_fill hold the same shared weights, and the scale search is the slow part."""
    if options.quant not in PRESETS:
        raise EdgeloopError(f"unknown --quant {options.quant!r}; choose one of {', '.join(PRESETS)}")
    if any(t.data_type == TensorProto.FLOAT16 for t in proto.graph.initializer if kinds.get(t.name) == "shared"):
        raise EdgeloopError(f"--quant {options.quant} needs a float32 graph; the {options.target} target builds "
                            "float16 (use --target cpu or --quant none)")
    if in_place:
        out = proto
    else:
        out = onnx.ModelProto()
        out.CopyFrom(proto)  # the fp32 graph stays intact: quality is measured against it
    kinds = dict(kinds)
    store = _WeightStore(out.graph, kinds, options, cache)
    store.heads = {n.input[1] for n in out.graph.node if n.op_type == "Gemm" and store.wants(n.input[1], "embedding")
                   and _is_plain_head(n)}
    # Bodies first: rewriting a graph copies its nodes, so a Loop's body must be final by then.
    for graph in reversed(list(_all_graphs(out.graph))):
        _rewrite(graph, store, options)
    store.drop_unused(list(_all_graphs(out.graph)))
    return out, kinds, store.summary()


def _all_graphs(graph: onnx.GraphProto):
    """The graph and, recursively, every subgraph (Loop bodies)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_graphs(attr.g)


def _rewrite(graph: onnx.GraphProto, store: _WeightStore, options) -> None:
    nodes = []
    for node in graph.node:
        new = _replacement(node, store, options)
        nodes.extend(new if new is not None else [node])
        if new is not None:
            _annotate(graph, new[-1].output[0])
    del graph.node[:]
    graph.node.extend(nodes)


def _replacement(node: onnx.NodeProto, store: _WeightStore, options) -> list[onnx.NodeProto] | None:
    """Nodes replacing `node`, or None to keep it."""
    if node.op_type == "MatMul" and (store.wants(node.input[1], "shared") or store.wants(node.input[1], "lora")):
        return [store.linear(node.input[0], node.input[1], node.output[0], transposed=False)]
    if node.op_type == "Gemm" and store.wants(node.input[1], "embedding") and _is_plain_head(node):
        return [store.linear(node.input[0], node.input[1], node.output[0], transposed=True)]
    if (node.op_type == "Gather" and store.wants(node.input[0], "embedding")
            and _attr(node, "axis", 0) == 0):
        return store.gather(node.input[0], node.input[1], node.output[0])
    return None


def _is_plain_head(node: onnx.NodeProto) -> bool:
    """Gemm(h, W, transB=1) with no bias or scaling: exactly h @ W.T."""
    return (len(node.input) == 2 and _attr(node, "transB", 0) == 1 and _attr(node, "transA", 0) == 0
            and _attr(node, "alpha", 1.0) == 1.0)


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _annotate(graph: onnx.GraphProto, name: str) -> None:
    """Contrib-op outputs need their type declared (ORT cannot always infer it inside Loop bodies)."""
    graph.value_info.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))


class _WeightStore:
    """Packs each float weight once and hands out the initializer names each consumer reads."""

    def __init__(self, graph: onnx.GraphProto, kinds: dict[str, str], options, cache: dict | None = None):
        self.graph, self.kinds, self.options = graph, kinds, options
        self.cache = cache  # (content, scheme, block, symmetric, search) -> packed, across graphs
        self.preset = {**PRESETS[options.quant], **(LORA_INT8 if options.lora_dtype == "int8" else {})}
        self.inits = {t.name: t for t in graph.initializer}
        self.packed: dict[str, qp.BlockPacked | qp.ChannelPacked] = {}
        self.names: dict[tuple[str, str], list[str]] = {}  # (weight, consumer) -> inputs
        self.kept: set[str] = set()
        self.errors = {"rtn": 0.0, "chosen": 0.0, "norm": 0.0}
        self.counter = 0
        self.heads: set[str] = set()  # tables an LM head reads (set by quantize_graph)
        self.notes: set[str] = set()

    # -- selection -----------------------------------------------------------------------------

    def wants(self, name: str, kind: str) -> bool:
        if name not in self.inits or self.kinds.get(name) != kind or kind not in self.preset:
            return False
        if kind == "embedding" and not self.options.quantize_embeddings:
            return False
        if len(self.inits[name].dims) != 2 or self.inits[name].data_type != TensorProto.FLOAT:
            return False  # fp16 graphs (cuda) and odd shapes stay as built
        if any(fnmatch.fnmatchcase(name, pat) for pat in self.options.keep_float):
            self.kept.add(name)
            return False
        return True

    def scheme(self, name: str) -> qp.QuantScheme:
        return qp.SCHEMES[self.preset[self.kinds[name]]]

    # -- packing -------------------------------------------------------------------------------

    def pack(self, name: str, transposed: bool):
        """Quantize the weight as W [K, N] (K = input dim). Embeddings are [V, H]: W = E.T."""
        if name not in self.packed:
            w = numpy_helper.to_array(self.inits[name]).astype(np.float32)
            w = np.ascontiguousarray(w.T if transposed else w)
            s, o = self.scheme(name), self.options
            size, search = self.block_size(name, w.shape[0]), o.scale_search and s.layout == "block"
            key = (hashlib.sha256(w).digest(), w.shape, s.name, size, o.symmetric, search)
            p = self.cache.get(key) if self.cache is not None else None
            if p is None:
                p = qp.quantize(w, s.name, block_size=size, symmetric=o.symmetric, search=search)
                self._track_error(w, p, s)  # the forward graph (packed first) reports these
                if self.cache is not None:
                    self.cache[key] = p
            self.packed[name] = p
        return self.packed[name]

    def block_size(self, name: str, k: int) -> int:
        """--block-size, except that a weight with fewer inputs than a block (a LoRA B, whose K is its
        rank; any weight of a small model) gets the smallest block MatMulNBits accepts that covers K:
        a block mostly made of padding would make the "quantized" weight larger than the float one."""
        if k >= self.options.block_size:
            return self.options.block_size
        size = max(16, 1 << (k - 1).bit_length())
        if self.kinds.get(name) != "lora":
            self.notes.add(f"--block-size {self.options.block_size} exceeds the input size {k} of some weights; "
                           f"they use blocks of {size}")
        return size

    def _track_error(self, w: np.ndarray, p, s: qp.QuantScheme) -> None:
        """Sum squared reconstruction errors, and plain RTN's for comparison (block schemes)."""
        err = float(((qp.dequantize(p) - w) ** 2).sum())
        rtn = err
        if s.layout == "block" and self.options.scale_search:
            o = self.options
            rtn_p = qp.quantize_blocks(w, bits=s.bits, block_size=p.block_size, symmetric=o.symmetric)
            rtn = float(((qp.dequantize(rtn_p) - w) ** 2).sum())
        self.errors["rtn"] += rtn
        self.errors["chosen"] += err
        self.errors["norm"] += float((w.astype(np.float64) ** 2).sum())

    def _add(self, name: str, array: np.ndarray, like: str | None) -> str:
        """A new initializer of the same kind as `like` (None: a small constant, kind other)."""
        if name not in self.inits:
            t = numpy_helper.from_array(np.ascontiguousarray(array), name)
            self.graph.initializer.append(t)
            self.inits[name] = t
            self.kinds[name] = self.kinds[like] if like else "other"
        return name

    # -- consumers -----------------------------------------------------------------------------

    def linear(self, x: str, name: str, y: str, transposed: bool) -> onnx.NodeProto:
        """y = x @ W (or x @ E.T for a head) as one contrib node."""
        p = self.pack(name, transposed)
        self.counter += 1
        if isinstance(p, qp.ChannelPacked):
            ins = [x, self._add(f"{name}.q8", p.codes, name), self._add(f"{name}.q8_scales", p.scales, name)]
            return helper.make_node("DynamicQuantizeMatMul", ins, [y], name=f"q8_{self.counter}", domain=MS)
        ins = [x, self._data(name, p), self._scales(name, p)]
        if p.zero_points is not None:
            ins.append(self._zeros(name, p))
        return helper.make_node("MatMulNBits", ins, [y], name=f"nbits_{self.counter}", domain=MS, K=p.k, N=p.n,
                                bits=p.bits, block_size=p.block_size, accuracy_level=self.options.accuracy_level)

    def gather(self, name: str, ids: str, y: str) -> list[onnx.NodeProto]:
        """Rows of a block-quantized [V, H] table. A table the LM head also reads (tied) is decoded
        with plain ops from the head's own codes, scales and zero points, so nothing is stored twice
        (GatherBlockQuantized would need rank-3 scales, which MatMulNBits rejects: ORT 1.32). An
        untied table uses one GatherBlockQuantized node."""
        p = self.pack(name, transposed=True)
        self.counter += 1
        if name in self.heads:
            rows = self._decode_rows(name, p, ids, f"{y}_blocks")
        else:
            rows = self._gather_block_quantized(name, p, ids, f"{y}_blocks")
        shape = self._add("quant.rows_shape", np.array([0, 0, -1], np.int64), None)
        flat = y if p.n_blocks * p.block_size == p.k else f"{y}_padded"
        rows.append(helper.make_node("Reshape", [f"{y}_blocks", shape], [flat], name=f"rows_flat_{self.counter}"))
        if flat != y:  # a partial tail block: drop its padding
            lims = [self._add(f"quant.slice_{v}", np.array([v], np.int64), None) for v in (0, p.k, -1)]
            rows.append(helper.make_node("Slice", [flat, *lims], [y], name=f"rows_trim_{self.counter}"))
        return rows

    def _gather_block_quantized(self, name: str, p: qp.BlockPacked, ids: str, out: str) -> list[onnx.NodeProto]:
        v, nb = p.n, p.n_blocks
        ins = [self._data(name, p), ids, self._add(f"{name}.gscales", p.scales.reshape(v, nb, 1), name)]
        if p.zero_points is not None:  # unpacked: one zero point per byte
            zps = qp.unpack_zero_points(p.zero_points, p.bits, v, nb).astype(np.uint8)
            ins.append(self._add(f"{name}.gzeros", zps.reshape(v, nb, 1), name))
        return [helper.make_node("GatherBlockQuantized", ins, [out], name=f"gbq_{self.counter}", domain=MS,
                                 gather_axis=0, quantize_axis=2, block_size=p.block_size, bits=p.bits)]

    def _decode_rows(self, name: str, p: qp.BlockPacked, ids: str, out: str) -> list[onnx.NodeProto]:
        """(code - zero point) * scale for the gathered rows: [b, t, n_blocks, block_size]."""
        b = _NodeList(f"dq{self.counter}")
        codes = b.unpack(b.add("Gather", self._data(name, p), ids), p.bits, self)  # [b, t, nb, bs]
        scales = b.add("Unsqueeze", b.add("Gather", self._scales(name, p), ids), self._const([-1]))
        if p.zero_points is None:
            zps = self._add(f"quant.zero_{p.bits}", np.array(2 ** (p.bits - 1), np.float32), None)
        else:
            zps = b.unpack(b.add("Gather", self._zeros(name, p), ids), p.bits, self)  # [b, t, >= nb]
            zps = b.add("Slice", zps, self._const([0]), self._const([p.n_blocks]), self._const([-1]))
            zps = b.add("Unsqueeze", zps, self._const([-1]))
        b.nodes.append(helper.make_node("Mul", [b.add("Sub", codes, zps), scales], [out], name=f"{b.prefix}_out"))
        return b.nodes

    def _const(self, values) -> str:
        arr = np.array(values, np.int64)
        return self._add("quant.c_" + "_".join(map(str, values)).replace("-", "m"), arr, None)

    def _data(self, name: str, p: qp.BlockPacked) -> str:
        return self._add(f"{name}.q{p.bits}", p.data, name)

    # Scales [N, n_blocks] and zero points [N, bytes per row] as 2-D tensors: MatMulNBits accepts
    # them so, and a row Gather (the tied embedding lookup) can read the same tensors.
    def _scales(self, name: str, p: qp.BlockPacked) -> str:
        return self._add(f"{name}.qscales", p.scales.reshape(p.n, p.n_blocks), name)

    def _zeros(self, name: str, p: qp.BlockPacked) -> str:
        return self._add(f"{name}.qzeros", p.zero_points.reshape(p.n, -1), name)

    # -- bookkeeping ---------------------------------------------------------------------------

    def drop_unused(self, graphs) -> None:
        """Remove float weights no node reads any more (a kept-float consumer keeps them)."""
        used = {i for g in graphs for n in g.node for i in n.input}
        keep = [t for t in self.graph.initializer if t.name in used or t.name not in self.packed]
        dropped = [t.name for t in self.graph.initializer if t.name in self.packed and t.name not in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(keep)
        for name in dropped:
            self.kinds.pop(name, None)

    def summary(self) -> dict:
        o = self.options
        info = {"scheme": o.quant, "schemes_by_kind": {k: v for k, v in self.preset.items()
                                                       if k != "embedding" or o.quantize_embeddings},
                "block_size": o.block_size, "symmetric": o.symmetric, "scale_search": o.scale_search,
                "accuracy_level": o.accuracy_level, "quantized_weights": sorted(self.packed),
                "kept_float": sorted(self.kept), "lora_dtype": o.lora_dtype, "notes": sorted(self.notes)}
        if self.errors["norm"]:
            info["rel_error"] = round(math.sqrt(self.errors["chosen"] / self.errors["norm"]), 6)
            info["rel_error_rtn"] = round(math.sqrt(self.errors["rtn"] / self.errors["norm"]), 6)
        return info


class _NodeList:
    """A few plain nodes with generated output names (the tied-embedding decode)."""

    def __init__(self, prefix: str):
        self.prefix, self.nodes = prefix, []

    def add(self, op: str, *inputs: str, **attrs) -> str:
        out = f"{self.prefix}_{len(self.nodes)}_{op.lower()}"
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=out, **attrs))
        return out

    def unpack(self, packed: str, bits: int, store: _WeightStore) -> str:
        """uint8 [..., m] -> float [..., m * 8 / bits] codes, low nibble first (4-bit)."""
        if bits == 4:
            four = store._add("quant.u8_4", np.array(4, np.uint8), None)
            mask = store._add("quant.u8_15", np.array(15, np.uint8), None)
            lo = self.add("Unsqueeze", self.add("BitwiseAnd", packed, mask), store._const([-1]))
            hi = self.add("Unsqueeze", self.add("BitShift", packed, four, direction="RIGHT"), store._const([-1]))
            pairs = self.add("Concat", lo, hi, axis=-1)  # [..., m, 2]
            shape = self.add("Concat", self.add("Slice", self.add("Shape", packed), store._const([0]),
                                                store._const([-1])), store._const([-1]), axis=0)
            packed = self.add("Reshape", pairs, shape)
        return self.add("Cast", packed, to=TensorProto.FLOAT)


# ---------------------------------------------------------------------------------------------
# quality vs the fp32 graph


def measure_quality(contract, artifact_dir: Path, fp32_file: Path, model, options) -> dict:
    """Mean KL(fp32 || quantized) of next-token distributions, top-1 agreement, perplexities. Both graphs
    run through the artifact's own driver and contract (the fp32 one as a different forward file)."""
    from dataclasses import replace

    from edgeloop.runtimes.ort import OrtBackend

    if contract.kv.dtype != "float32":
        return {"skipped": "quality is measured on CPU float32 graphs only"}
    ids, source = calibration_ids(model, options)
    quant = OrtBackend(artifact_dir, contract)
    entries = dict(contract.entry_points)
    entries["forward"] = replace(entries["forward"], symbol=fp32_file.name)
    fp32 = OrtBackend(fp32_file.parent, replace(contract, entry_points=entries))
    window = min(QUALITY_WINDOW, model.spec.max_position)
    totals = {"kl": 0.0, "agree": 0, "nll_fp32": 0.0, "nll": 0.0, "positions": 0, "scored": 0}
    for start in range(0, len(ids), window):
        chunk = ids[start:start + window]
        if len(chunk) < 2:
            break
        _accumulate(totals, _logits(fp32, chunk), _logits(quant, chunk), chunk)
    n, m = totals["positions"], totals["scored"]
    ppl32, ppl = math.exp(totals["nll_fp32"] / m), math.exp(totals["nll"] / m)
    for value in (totals["kl"], ppl32, ppl):
        if not math.isfinite(value):
            raise EdgeloopError("the quantized or float graph produced non-finite logits on the calibration text; "
                                "the model's weights or config are broken")
    return {"text": source, "tokens": n, "mean_kl": float(f"{totals['kl'] / n:.3g}"),
            "top1_agreement": round(totals["agree"] / n, 4), "perplexity_fp32": round(ppl32, 4),
            "perplexity": round(ppl, 4), "perplexity_delta": round(ppl - ppl32, 4)}


def _accumulate(totals: dict, ref: np.ndarray, q: np.ndarray, ids: np.ndarray) -> None:
    lp_ref, lp_q = _log_softmax(ref), _log_softmax(q)  # [t, V] float64
    totals["kl"] += float((np.exp(lp_ref) * (lp_ref - lp_q)).sum())
    totals["agree"] += int((ref.argmax(-1) == q.argmax(-1)).sum())
    rows, nxt = np.arange(len(ids) - 1), ids[1:]
    totals["nll_fp32"] -= float(lp_ref[rows, nxt].sum())
    totals["nll"] -= float(lp_q[rows, nxt].sum())
    totals["positions"] += len(ids)
    totals["scored"] += len(ids) - 1


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _logits(backend, ids: np.ndarray) -> np.ndarray:
    """One prefill of `ids` from an empty cache; logits of every position [t, V]."""
    from edgeloop.runtimes.backend import Row

    state = backend.new_state()
    try:
        return backend.step([Row(state, ids, all_logits=True)])[0].logits
    finally:
        backend.release(state)


def calibration_ids(model, options) -> tuple[np.ndarray, str]:
    """Token ids to score and where they came from: --calibration-text, else the model's own
    heldout.txt (kept by `edgeloop convert` when the checkpoint ships one) or that of the checkpoint
    it was converted from, else random ids."""
    from edgeloop.checkpoint import original_checkpoint
    from edgeloop.fileio import read_text

    original = original_checkpoint(Path(model.path), model.source or {})
    if options.calibration_text:
        text_file = Path(options.calibration_text)
    elif (Path(model.path) / "heldout.txt").is_file():
        text_file = Path(model.path) / "heldout.txt"
    elif original is not None and (original / "heldout.txt").is_file():
        text_file = original / "heldout.txt"
    else:
        text_file = None
    tokenizer = Path(model.path) / "tokenizer.json"
    if text_file is not None:
        text = read_text(text_file, "calibration text")
        if tokenizer.is_file():
            from edgeloop.runtimes.tokenizer import Tokenizer, resolve_tokenizer

            section, _ = resolve_tokenizer(model.path, model.generation, model.spec.vocab_size)
            ids = np.asarray(Tokenizer(model.path, section).encode(text)[:QUALITY_TOKENS], np.int64)
            if len(ids) >= 2:
                return ids, str(text_file)
        if options.calibration_text:
            raise EdgeloopError(f"--calibration-text {options.calibration_text}: the model has no tokenizer.json to "
                                "encode it, or the text is shorter than two tokens")
    rng = np.random.default_rng(0)
    return rng.integers(0, model.spec.vocab_size, RANDOM_TOKENS).astype(np.int64), "random token ids"
