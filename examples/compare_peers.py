"""edgeloop against the tools users would pick instead, measured side by side in one process.

    python examples/compare_peers.py --models kjv,smollm-135m --loops 2,4 --threads 1,2 --rounds 3 \
        --work /tmp/cmp --json results.json --plot docs/peers.png

For every model (the bundled `kjv` model, a `REAL_SHAPES` preset with random weights, or
`tiny:<family>`) and every loop count B, the script prepares (cached under --work):

- the original HF checkpoint (presets: `make_hf_checkpoint`, optionally capped to --max-layers);
- the relaxed recursive model (`edgeloop.convert`, --lora-rank) and a strict one of the same
  shape (lora rank 0, per-depth norms kept, so the only difference is the LoRA);
- the merged equivalent vanilla checkpoint (`edgeloop export-merged`);
- the edgeloop artifacts the engine list asks for, and onnxruntime-genai models built with
  `python -m onnxruntime_genai.models.builder` from the original and the merged checkpoints.

Engines (--engines, comma-separated; `all` = every one):
    el-{loop,unrolled}-{fp32,int8,int4}   edgeloop ONNX Runtime artifacts (int4 = layers + head/embedding)
    el-{loop,unrolled}-int4-f16lora       the same with float16 LoRA storage
    el-unrolled-int4-i8lora               the same with int8 LoRA (8-bit MatMulNBits per depth)
    el-strict-{loop,unrolled}-int4        strict recursive (lora rank 0) artifact, same shape
    el-tvm-fp32                           edgeloop TVM CPU artifact
    ref                                   edgeloop's PyTorch reference on the recursive model dir
    hf-eager                              transformers eager on the original checkpoint
    og-{orig,merged}-{int4,fp32}          onnxruntime-genai on the original / merged checkpoint

Engines that do not depend on B (hf-eager, og-orig-*) are measured once per model. All engines of
a model are measured together: per round, in a shuffled order, each engine does time-to-first-token
for every --ttft prompt length (fresh sequence) and decode tok/s at every --contexts length (the
sequence of the last prompt at or below it, grown between measurements), with greedy decoding. Thread counts are run one after the
other (one set of sessions per count). Peak RSS: a fresh subprocess per engine that loads it,
prefills 128 tokens and decodes 8. Agreement: 32 greedy tokens after a 128-token prompt of held-out
text, compared with the function's fp32 oracle (`ref` for the recursive function, `hf-eager` for the
original), reported as identical or the first diverging position.

`--profile ENGINE` (with one model/B) writes an ONNX Runtime profile of decode steps and prints kernel
time aggregated by op type, and for edgeloop artifacts by role (LoRA / shared block / attention / ...).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
KJV = ROOT / "examples" / "kjv-tiny"
EL_QUANT = {"fp32": {}, "int8": {"quant": "int8"},
            "int4": {"quant": "int4", "quantize_embeddings": True},
            "int4-f16lora": {"quant": "int4", "quantize_embeddings": True, "lora_dtype": "float16"},
            "int4-i8lora": {"quant": "int4", "quantize_embeddings": True, "lora_dtype": "int8"}}
ALL_ENGINES = ([f"el-{lay}-{q}" for lay in ("loop", "unrolled") for q in EL_QUANT
                if not (lay == "loop" and q.endswith("i8lora"))]  # int8 LoRA: unrolled graphs only
               + ["el-strict-loop-int4", "el-strict-unrolled-int4", "el-tvm-fp32", "ref", "hf-eager"]
               + [f"og-{src}-{p}" for src in ("orig", "merged") for p in ("int4", "fp32")])
VANILLA = ("hf-eager", "og-orig-int4", "og-orig-fp32")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ---------------------------------------------------------------------------------------------
# preparation (cached)


def model_config(name: str, max_layers: int | None) -> dict | None:
    from edgeloop.presets import REAL_SHAPES, TINY

    if name == "kjv":
        return None
    cfg = dict(TINY[name.split(":", 1)[1]]) if name.startswith("tiny:") else dict(REAL_SHAPES[name])
    if max_layers and cfg["num_hidden_layers"] > max_layers:
        cfg["num_hidden_layers"] = max_layers
    cfg["max_position_embeddings"] = max(cfg.get("max_position_embeddings", 2048), 2048) if not name.startswith("tiny:") else cfg["max_position_embeddings"]
    return cfg


class Prepared:
    """Paths for one model: original checkpoint and, per B, recursive / strict / merged dirs."""

    def __init__(self, name: str, work: Path, args):
        self.name, self.args = name, args
        self.root = work / (name.replace(":", "-") + (f"-L{args.max_layers}" if args.max_layers else ""))
        self.root.mkdir(parents=True, exist_ok=True)
        cfg = model_config(name, args.max_layers)
        if cfg is None:
            self.orig = KJV
        else:
            self.orig = self.root / "hf"
            if not (self.orig / "tokenizer.json").is_file():
                from edgeloop.presets import make_hf_checkpoint

                log(f"[prep] random {name} checkpoint ({cfg['num_hidden_layers']} layers) -> {self.orig}")
                make_hf_checkpoint(cfg, self.orig)
        self.layers = json.loads((self.orig / "config.json").read_text())["num_hidden_layers"]

    def sharing(self, loops: int) -> str:
        if self.layers % loops == 0:
            return "cycle"
        if (self.layers - 2) % loops == 0:
            return "middle-cycle"
        raise SystemExit(f"{self.name}: {self.layers} layers cannot be looped {loops} times")

    def recursive(self, loops: int, rank: int | None = None) -> Path:
        import edgeloop

        rank = self.args.lora_rank if rank is None else rank
        out = self.root / f"B{loops}-r{rank}"
        if not (out / "config.json").is_file():
            log(f"[prep] convert {self.orig} B={loops} rank={rank} -> {out}")
            kw = {"share_norms": False} if rank == 0 else {}
            edgeloop.convert(self.orig, out, loops=loops, lora_rank=str(rank), sharing=self.sharing(loops), **kw)
        return out

    def merged(self, loops: int) -> Path:
        from edgeloop.export import export_merged

        out = self.root / f"B{loops}-r{self.args.lora_rank}-merged"
        if not (out / "config.json").is_file():
            log(f"[prep] export-merged B={loops} -> {out}")
            export_merged(self.recursive(loops), out)
        return out

    def artifact(self, loops: int, engine: str) -> Path:
        from edgeloop.compiler import CompileOptions, compile_model

        strict = "-strict-" in engine
        parts = engine.split("-")[1:]
        if strict:
            parts = parts[1:]
        if parts[0] == "tvm":
            opts = {"backend": "tvm", "layout": "loop"}
        else:
            opts = {"layout": parts[0], **EL_QUANT["-".join(parts[1:])]}
        src = self.recursive(loops, 0 if strict else None)
        out = self.root / f"{src.name}-{'-'.join(parts)}"
        if not (out / "edgeloop.json").is_file():
            log(f"[prep] compile {src.name} {opts} -> {out}")
            if self.args.calibration_text and opts.get("quant"):
                opts["calibration_text"] = self.args.calibration_text
            if opts.get("quant") and self.name not in ("kjv",) and not self.name.startswith("tiny:"):
                opts["scale_search"] = False  # random weights: speed only, and round-to-nearest packs 10x faster
            compile_model(src, out, CompileOptions(**opts))
        return out

    def genai(self, loops: int | None, engine: str) -> Path:
        src_kind, prec = engine.split("-")[1:]
        src = self.orig if src_kind == "orig" else self.merged(loops)
        out = self.root / (f"og-orig-{prec}" if src_kind == "orig" else f"og-B{loops}-merged-{prec}")
        if not (out / "genai_config.json").is_file():
            cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out),
                   "-p", prec, "-e", "cpu", "-c", str(self.root / "og-cache")]
            if prec == "int4":
                cmd += ["--extra_options", "int4_accuracy_level=4", "int4_block_size=32"]
            log(f"[prep] {' '.join(cmd)}")
            res = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
            if res.returncode != 0 or not (out / "genai_config.json").is_file():
                raise RuntimeError(f"onnxruntime-genai builder failed on {src}: "
                                   f"{(res.stderr or res.stdout).strip().splitlines()[-1:]}")
        return out

    def engine_path(self, loops: int | None, engine: str) -> Path:
        if engine.startswith("el-"):
            return self.artifact(loops, engine)
        if engine == "ref":
            return self.recursive(loops)
        if engine == "hf-eager":
            return self.orig
        if engine.startswith("og-"):
            return self.genai(loops, engine)
        raise SystemExit(f"unknown engine {engine!r}; choose from {', '.join(ALL_ENGINES)}")


# ---------------------------------------------------------------------------------------------
# engines: one greedy-decoding interface over every runtime


class EdgeloopEngine:
    """An edgeloop artifact (ORT/TVM) or model dir (PyTorch reference) through its backend."""

    def __init__(self, path: Path, threads: int):
        import edgeloop

        self.path, self.threads = path, threads
        artifact = (path / "edgeloop.json").is_file()
        self.model = edgeloop.load(path, threads=threads) if artifact else edgeloop.load(path)
        self.backend = self.model.backend
        self.is_torch = self.backend.name == "reference"
        self.is_tvm = self.backend.name == "tvm"

    def activate(self):  # torch and TVM thread pools are process-wide: set before each use
        if self.is_torch:
            import torch

            torch.set_num_threads(self.threads)
        elif self.is_tvm:
            import tvm

            tvm.get_global_func("runtime.config_threadpool")(1, int(self.threads))

    def _step(self, ids) -> np.ndarray:
        from edgeloop.runtimes.backend import Row

        return self.backend.step([Row(self.state, np.asarray(ids, dtype=np.int64))])[0].logits

    def start(self, ids: np.ndarray) -> int:
        if getattr(self, "state", None) is not None:
            self.backend.release(self.state)
        self.state = self.backend.new_state()
        self.logits = self._step(ids)
        return int(np.argmax(self.logits[-1]))

    def extend(self, ids: np.ndarray) -> None:
        self.logits = self._step(ids)

    def length(self) -> int:
        return self.state.length

    def decode(self, n: int) -> list[int]:
        out = []
        for _ in range(n):
            tok = int(np.argmax(self.logits[-1]))
            out.append(tok)
            self.logits = self._step([tok])
        return out


class HFEagerEngine:
    """transformers eager (AutoModelForCausalLM, fp32, DynamicCache) on the original checkpoint."""

    def __init__(self, path: Path, threads: int):
        import torch
        import transformers

        self.torch, self.threads = torch, threads
        self.model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def activate(self):
        self.torch.set_num_threads(self.threads)

    def _run(self, ids):
        with self.torch.inference_mode():
            out = self.model(input_ids=self.torch.as_tensor(np.asarray(ids, dtype=np.int64)).reshape(1, -1),
                             past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.cache = out.past_key_values
        self.n += len(ids)
        self.logits = out.logits[0, -1].numpy()

    def start(self, ids) -> int:
        from transformers import DynamicCache

        self.cache, self.n = DynamicCache(config=self.model.config), 0
        self._run(ids)
        return int(np.argmax(self.logits))

    def extend(self, ids):
        self._run(ids)

    def length(self) -> int:
        return self.n

    def decode(self, n: int) -> list[int]:
        out = []
        for _ in range(n):
            tok = int(np.argmax(self.logits))
            out.append(tok)
            self._run([tok])
        return out


class GenaiEngine:
    """onnxruntime-genai Model + Generator (greedy search), CPU, intra-op threads set by config overlay."""

    def __init__(self, path: Path, threads: int, max_length: int = 2048, profile: str | None = None):
        import onnxruntime_genai as og

        self.og, self.threads, self.path = og, threads, path
        cfg = og.Config(str(path))
        # no spinning, as edgeloop's sessions: spinning workers left behind by one engine would steal the
        # cores from the next one measured in this process (torch at 2 threads fell to ~3 tok/s)
        so = {"intra_op_num_threads": threads, "session.intra_op.allow_spinning": "0"}
        if profile:
            so["enable_profiling"] = profile
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": so}}}))
        self.model = og.Model(cfg)
        ctx = json.loads((path / "genai_config.json").read_text())["model"]["context_length"]
        self.max_length = min(max_length, ctx)

    def activate(self):
        pass

    def start(self, ids) -> int:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.max_length, do_sample=False, batch_size=1)
        self.gen = self.og.Generator(self.model, params)
        self.gen.append_tokens(np.asarray(ids, dtype=np.int32).reshape(1, -1))
        self.pending = True  # logits computed, next token not yet picked
        return int(np.argmax(self.gen.get_logits().reshape(-1)[-self._vocab():]))

    def _vocab(self) -> int:
        return int(self.gen.get_logits().shape[-1])

    def extend(self, ids):
        self.gen.append_tokens(np.asarray(ids, dtype=np.int32).reshape(1, -1))
        self.pending = True

    def length(self) -> int:
        return int(self.gen.token_count())

    def decode(self, n: int) -> list[int]:
        out = []
        for _ in range(n):
            self.gen.generate_next_token()  # runs the model on the last picked token (if any), picks greedily
            out.append(int(self.gen.get_next_tokens()[0]))
        return out


def make_engine(engine: str, path: Path, threads: int):
    if engine.startswith("og-"):
        return GenaiEngine(path, threads)
    if engine == "hf-eager":
        return HFEagerEngine(path, threads)
    return EdgeloopEngine(path, threads)


# ---------------------------------------------------------------------------------------------
# measurement


def prompt_ids(tokenizer_dir: Path, n: int, vocab: int) -> np.ndarray:
    """`n` token ids of held-out KJV text (wrapped if short), clipped to the vocab."""
    from tokenizers import Tokenizer

    text = (KJV / "heldout.txt").read_text(encoding="utf-8")
    ids = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).encode(text[:200_000]).ids
    ids = np.array([i for i in ids if i < vocab], dtype=np.int64)
    return np.resize(ids, n)


def measure_round(e, ids: np.ndarray, ttft: list[int], contexts: list[int], steps: int) -> dict:
    """TTFT for each prompt length (fresh sequence, shortest first); after each, decode tok/s at every
    context from that length up to the next prompt length, growing the same sequence in between
    (so 128 -> decode@128, then 512 -> decode@512 -> grow -> decode@1024: no prompt is prefilled twice)."""
    e.activate()
    res = {"ttft_ms": {}, "decode_tok_s": {}}
    starts = sorted(set(ttft) | ({contexts[0]} if contexts[0] < min(ttft) else set()))
    for i, p in enumerate(starts):
        t0 = time.perf_counter()
        e.start(ids[:p])
        if p in ttft:
            res["ttft_ms"][p] = (time.perf_counter() - t0) * 1000
        end = starts[i + 1] if i + 1 < len(starts) else float("inf")
        for c in (c for c in contexts if p <= c < end):
            if e.length() < c:
                e.extend(ids[e.length():c])
            t0 = time.perf_counter()
            e.decode(steps)
            res["decode_tok_s"][c] = steps / (time.perf_counter() - t0)
    e.start(ids[:8])  # release the long sequence's KV before the next engine runs
    return res


def agreement(e, ids: np.ndarray, n: int) -> list[int]:
    e.activate()
    first = e.start(ids)
    return [first] + e.decode(n - 1)


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None


RSS_CHILD = r"""
import json, sys, numpy as np
spec = json.loads(sys.argv[1])
sys.path.insert(0, spec["examples"])
if spec["engine"].startswith("og-"):
    import onnxruntime_genai
elif spec["engine"] in ("hf-eager", "ref"):
    import torch, transformers, edgeloop
else:
    import edgeloop, onnxruntime
    if "tvm" in spec["engine"]:
        import tvm
def hwm():  # VmHWM is per address space (ru_maxrss survives exec and would report the parent's peak)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
base = hwm()
from pathlib import Path
from compare_peers import make_engine
e = make_engine(spec["engine"], Path(spec["path"]), spec["threads"])
e.activate()
e.start(np.array(spec["ids"], dtype=np.int64))
e.decode(8)
print(json.dumps({"import_mb": round(base, 1),
                  "peak_mb": round(hwm(), 1)}))
"""


def peak_rss(engine: str, path: Path, threads: int, ids: np.ndarray) -> dict:
    """Peak RSS of a fresh process that loads the engine, prefills `ids` and decodes 8 tokens."""
    spec = json.dumps({"engine": engine, "path": str(path), "threads": threads, "ids": ids.tolist(),
                       "examples": str(Path(__file__).resolve().parent)})
    # stdin closed: a child of a background job that touches the terminal would be stopped (SIGTTIN)
    res = subprocess.run([sys.executable, "-c", RSS_CHILD, spec], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def stats(xs: list[float]) -> dict:
    return {"min": round(min(xs), 3), "median": round(statistics.median(xs), 3), "max": round(max(xs), 3),
            "n": len(xs)}


def run_model(name: str, args) -> list[dict]:
    prep = Prepared(name, Path(args.work), args)
    engines = ALL_ENGINES if args.engines == "all" else [e.strip() for e in args.engines.split(",") if e.strip()]
    jobs = []  # (label, engine, B or None, path)
    for engine in engines:
        for loops in ([None] if engine in VANILLA else args.loops):
            label = engine if loops is None else f"B{loops}/{engine}"
            try:
                path = prep.engine_path(loops, engine)
            except Exception as ex:  # a peer that cannot build this model is reported, not fatal
                log(f"[skip] {name} {label}: {ex}")
                jobs.append({"label": label, "engine": engine, "loops": loops, "path": None, "error": str(ex)})
                continue
            jobs.append({"label": label, "engine": engine, "loops": loops, "path": path})
    if args.prepare_only:
        return []
    runnable = [j for j in jobs if j["path"] is not None]
    vocab = json.loads((prep.orig / "config.json").read_text())["vocab_size"]
    need = max(max(args.contexts) + args.decode_steps + 2, max(args.ttft), args.agree_prompt)
    ids = prompt_ids(prep.orig, need, vocab)
    results = []
    for threads in args.threads:
        live = []
        for j in runnable:
            try:
                live.append((j, make_engine(j["engine"], j["path"], threads)))
            except Exception as ex:
                log(f"[skip] {name} {j['label']} @{threads}t: cannot load: {ex}")
                results.append({"model": name, "label": j["label"], "threads": threads, "error": str(ex)})
        recs = {j["label"]: {"model": name, "label": j["label"], "engine": j["engine"], "loops": j["loops"],
                             "threads": threads, "path": str(j["path"]), "bytes_on_disk": dir_size(j["path"]),
                             "ttft_ms": {}, "decode_tok_s": {}} for j, _ in live}
        # agreement (also the warm-up: first-run allocations and prepacking are not measured)
        for j, e in live:
            toks = agreement(e, ids[:args.agree_prompt], args.agree_tokens)
            recs[j["label"]]["greedy"] = toks
            measure_round(e, ids, [min(args.ttft)], [min(args.contexts)], 2)
        rng = random.Random(args.seed + threads)
        for r in range(args.rounds):
            order = list(range(len(live)))
            rng.shuffle(order)
            for i in order:
                j, e = live[i]
                m = measure_round(e, ids, args.ttft, args.contexts, args.decode_steps)
                rec = recs[j["label"]]
                for k in ("ttft_ms", "decode_tok_s"):
                    for c, v in m[k].items():
                        rec[k].setdefault(str(c), []).append(v)
            log(f"[{name} {threads}t] round {r + 1}/{args.rounds} done")
        del live
        gc.collect()
        for rec in recs.values():
            rec["ttft_ms"] = {c: stats(v) for c, v in rec["ttft_ms"].items()}
            rec["decode_tok_s"] = {c: stats(v) for c, v in rec["decode_tok_s"].items()}
            if args.rss:
                rec["rss"] = peak_rss(rec["engine"], Path(rec["path"]), threads, ids[:128])
        # agreement vs the function's oracle
        for rec in recs.values():
            fn = "original" if rec["engine"] in VANILLA else ("strict" if "strict" in rec["engine"] else "recursive")
            rec["function"] = fn
            oracle_label = {"original": "hf-eager", "recursive": f"B{rec['loops']}/ref",
                            "strict": None}[fn]
            if fn == "original" and oracle_label not in recs:
                oracle_label = "og-orig-fp32"
            if fn == "recursive" and oracle_label not in recs:
                oracle_label = f"B{rec['loops']}/el-unrolled-fp32"
            oracle = recs.get(oracle_label) if oracle_label else None
            if oracle is not None:
                d = first_divergence(rec["greedy"], oracle["greedy"])
                rec["agreement"] = {"vs": oracle_label, "identical": d is None, "first_divergence": d,
                                    "tokens": len(rec["greedy"])}
        results.extend(recs.values())
    return results


# ---------------------------------------------------------------------------------------------
# profiling


def profile(name: str, args) -> dict:
    """ORT profile of decode steps; kernel time by op type (and by role for edgeloop graphs)."""
    import onnx
    import onnxruntime as ort

    prep = Prepared(name, Path(args.work), args)
    engine, loops = args.profile, args.loops[0]
    path = prep.engine_path(None if engine in VANILLA else loops, engine)
    threads = args.threads[-1]
    prefix = str(Path(args.work) / f"profile-{name}-B{loops}-{engine}-{threads}t".replace(":", "-"))
    if engine.startswith("og-"):
        e = GenaiEngine(path, threads, profile=prefix)
        onnx_path = path / "model.onnx"
    else:
        e = EdgeloopEngine(path, threads)
        onnx_path = path / e.model.contract.entry("forward").symbol
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.intra_op_num_threads = threads
        so.enable_profiling = True
        so.profile_file_prefix = prefix
        e.backend.session = e.backend._sessions["forward"] = ort.InferenceSession(
            str(onnx_path), so, providers=["CPUExecutionProvider"])
        e.backend._bindings.clear()
    vocab = json.loads((prep.orig / "config.json").read_text())["vocab_size"]
    ctx = args.contexts[0]
    ids = prompt_ids(prep.orig, ctx + 8, vocab)
    e.start(ids[:ctx])
    e.decode(args.decode_steps)
    if engine.startswith("og-"):
        del e
        gc.collect()
        files = sorted(Path(prefix).parent.glob(Path(prefix).name + "*.json"), key=os.path.getmtime)
        prof_file = files[-1]
    else:
        prof_file = Path(e.backend.session.end_profiling())
    # node name -> role, from the graph: LoRA (tensor names carry "lora"), weight matmuls (an initializer
    # input), attention core (matmuls of activations, softmax, fused attention), norms, and glue
    model = onnx.load(str(onnx_path), load_external_data=False)
    inits, nodes, body_nodes = set(), {}, set()

    def walk(graph, in_body):
        inits.update(i.name for i in graph.initializer)
        for n in graph.node:
            nodes[n.name] = n
            if in_body:
                body_nodes.add(n.name)
            for a in n.attribute:
                if a.g and a.g.node:
                    walk(a.g, True)
    walk(model.graph, False)
    matmuls = {"MatMul", "FusedMatMul", "Gemm", "MatMulNBits", "DynamicQuantizeMatMul", "MatMulInteger"}

    def role(node_name: str, op: str) -> str:
        n = nodes.get(node_name)
        names = " ".join(list(n.input) + list(n.output)).lower() if n is not None else ""
        # attention and norm nodes first: their inputs may be named after the LoRA add feeding them
        if op in ("Softmax", "GroupQueryAttention", "MultiHeadAttention", "Attention"):
            return "attention core"
        if "Norm" in op:
            return "norms"
        if "lora" in names:
            return "lora"
        if op in matmuls:
            weight = n is not None and (op in ("MatMulNBits", "DynamicQuantizeMatMul") or any(i in inits for i in n.input))
            return "weight matmul" if weight else "attention core"
        if op in ("Gather", "GatherBlockQuantized") and n is not None and any(i in inits for i in n.input):
            return "embedding/gather of weights"
        return "glue (reshape/concat/rope/mask/KV/...)"

    events = json.loads(prof_file.read_text())
    runs = sorted((ev for ev in events if ev.get("cat") == "Session" and ev.get("name") == "model_run"),
                  key=lambda ev: ev["ts"])
    decode_from = runs[1]["ts"] if len(runs) > 1 else 0  # run 0 is the prefill of the context
    events = [ev for ev in events if ev.get("ts", 0) >= decode_from]
    by_op, by_role, node_total, loop_total, body_total, run_total = {}, {}, 0.0, 0.0, 0.0, 0.0
    for ev in events:
        if ev.get("cat") == "Session" and ev.get("name") == "model_run":
            run_total += ev["dur"]
        if ev.get("cat") != "Node" or not ev.get("name", "").endswith("_kernel_time"):
            continue
        node = ev["name"][: -len("_kernel_time")]
        op = ev.get("args", {}).get("op_name", "?")
        if op == "Loop":  # its time includes the body nodes, which are profiled separately
            loop_total += ev["dur"]
            continue
        if node in body_nodes:
            body_total += ev["dur"]
        by_op[op] = by_op.get(op, 0) + ev["dur"]
        node_total += ev["dur"]
        r = role(node, op)
        by_role[r] = by_role.get(r, 0) + ev["dur"]
    if loop_total:
        by_role["Loop overhead (Loop time - its body nodes)"] = max(loop_total - body_total, 0.0)
        node_total += by_role["Loop overhead (Loop time - its body nodes)"]
    steps = args.decode_steps
    steps = max(len(runs) - 1, 1)
    out = {"model": name, "engine": engine, "loops": loops, "threads": threads, "context": ctx, "steps": steps,
           "profile_file": str(prof_file), "model_run_us_total": run_total, "node_us_total": node_total,
           "by_op_us_per_token": {k: round(v / steps, 1) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])},
           "by_role_us_per_token": {k: round(v / steps, 1) for k, v in sorted(by_role.items(), key=lambda kv: -kv[1])},
           "share_of_node_time": {k: round(v / node_total, 4) for k, v in by_role.items()} if node_total else {}}
    return out


# ---------------------------------------------------------------------------------------------
# output


def plot(results: list[dict], out: Path, context: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if "decode_tok_s" in r and context in r["decode_tok_s"]]
    models = list(dict.fromkeys(r["model"] for r in rows))
    threads = sorted({r["threads"] for r in rows})
    fig, axes = plt.subplots(len(models), 1, figsize=(11, 3.2 * len(models) + 0.6), squeeze=False)
    for ax, model in zip(axes[:, 0], models):
        labels = list(dict.fromkeys(r["label"] for r in rows if r["model"] == model))
        width = 0.8 / len(threads)
        for k, t in enumerate(threads):
            vals, errs_lo, errs_hi = [], [], []
            for lab in labels:
                rec = next((r for r in rows if r["model"] == model and r["label"] == lab and r["threads"] == t), None)
                s = rec["decode_tok_s"][context] if rec else {"median": 0, "min": 0, "max": 0}
                vals.append(s["median"])
                errs_lo.append(s["median"] - s["min"])
                errs_hi.append(s["max"] - s["median"])
            xs = np.arange(len(labels)) + k * width
            ax.bar(xs, vals, width, yerr=[errs_lo, errs_hi], label=f"{t} thread{'s' if t > 1 else ''}", capsize=2)
        ax.set_xticks(np.arange(len(labels)) + width * (len(threads) - 1) / 2)
        ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=7)
        ax.set_ylabel("decode tok/s")
        ax.set_title(f"{model}: decode tok/s at context {context} (median, min-max bars)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def table(results: list[dict]) -> str:
    lines = []
    ctxs = sorted({c for r in results for c in r.get("decode_tok_s", {})}, key=int)
    ttfts = sorted({c for r in results for c in r.get("ttft_ms", {})}, key=int)
    head = (["model", "engine", "thr", "MB disk", "peak RSS MB"] + [f"TTFT@{p} ms" for p in ttfts]
            + [f"tok/s@{c} (min/med/max)" for c in ctxs] + ["greedy vs oracle"])
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in results:
        if "error" in r and "decode_tok_s" not in r:
            lines.append(f"| {r['model']} | {r['label']} | {r.get('threads', '')} | error: {r['error'][:80]} |")
            continue
        rss = r.get("rss", {})
        agree = r.get("agreement")
        agree_s = "-" if not agree else ("oracle" if agree["vs"] == r["label"] else
                                         "identical" if agree["identical"] else f"diverges @{agree['first_divergence']}")
        row = [r["model"], r["label"], str(r["threads"]), f"{r['bytes_on_disk'] / 1e6:.1f}",
               f"{rss.get('peak_mb', '-')}"]
        row += [f"{r['ttft_ms'][p]['median']:.1f}" if p in r["ttft_ms"] else "-" for p in ttfts]
        row += [("{min:.0f}/{median:.0f}/{max:.0f}".format(**r["decode_tok_s"][c])) if c in r["decode_tok_s"] else "-"
                for c in ctxs]
        row.append(agree_s)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda s: [int(x) for x in s.split(",") if x.strip()]  # noqa: E731
    ap.add_argument("--models", default="kjv", help="kjv, REAL_SHAPES presets (smollm-135m, qwen2.5-0.5b, "
                                                     "tinyllama-1.1b) or tiny:<family>, comma-separated")
    ap.add_argument("--loops", type=ints, default=[2, 4], help="B values, comma-separated")
    ap.add_argument("--lora-rank", type=int, default=32)
    ap.add_argument("--max-layers", type=int, default=None, help="cap the layers of preset checkpoints")
    ap.add_argument("--engines", default="all", help=f"comma-separated subset of: {', '.join(ALL_ENGINES)}")
    ap.add_argument("--threads", type=ints, default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ttft", type=ints, default=[128, 512], help="prompt lengths for time to first token")
    ap.add_argument("--contexts", type=ints, default=[128, 512, 1024], help="contexts for decode tok/s")
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--agree-prompt", type=int, default=128)
    ap.add_argument("--agree-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rss", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--work", default="/tmp/edgeloop-compare", help="cache of checkpoints and artifacts")
    ap.add_argument("--json", dest="json_out", default=None, help="write raw results here")
    ap.add_argument("--plot", default=None, help="write a PNG of decode tok/s here")
    ap.add_argument("--plot-context", default=None, help="context shown in the plot (default: the first)")
    ap.add_argument("--calibration-text", default=None,
                    help="text for the quality report of quantized compiles (a short file compiles faster)")
    ap.add_argument("--prepare-only", action="store_true", help="build everything, measure nothing")
    ap.add_argument("--profile", default=None, help="profile one engine's decode (ORT kernel time by op/role)")
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.profile:
        out = [profile(m, args) for m in models]
        print(json.dumps(out, indent=1))
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(out, indent=1))
        return 0
    started = time.time()
    load0 = os.getloadavg()
    results = []
    for m in models:
        results.extend(run_model(m, args))
    if args.prepare_only:
        return 0
    meta = {"argv": sys.argv, "python": platform.python_version(), "machine": platform.machine(),
            "cpus": len(os.sched_getaffinity(0)), "loadavg_start": load0, "loadavg_end": os.getloadavg(),
            "seconds": round(time.time() - started, 1), "args": {k: v for k, v in vars(args).items()}}
    for r in results:
        r.pop("greedy", None) if not args.json_out else None
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    if args.plot:
        plot(results, Path(args.plot), args.plot_context or str(args.contexts[0]))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
