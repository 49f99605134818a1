"""Single-stream decode of this checkout against an earlier commit, side by side in one run.

    python examples/compare_commits.py --base 8e87053 --model examples/kjv-tiny --loops 4 --lora-rank 32 \
        [--compile "--quant int4"] [--tokens 128] [--rounds 6] [--threads 2] [--work /tmp/commits]

The base commit is checked out as a git worktree under --work and run from there (first on
sys.path, the editable install's import hook removed, the package layout of pyproject.toml rebuilt
as symlinks), so each side converts, compiles and runs with its own code: artifacts of different
format versions cannot be read by the other runtime.
The same checkpoint is converted and compiled by both; then decode is measured in fresh processes,
alternating base / head for --rounds rounds (greedy, --tokens tokens after a 64-token prompt, full
depth), and the medians are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

MEASURE = """
import json, sys, time
import edgeloop
m = edgeloop.load(sys.argv[1], threads=int(sys.argv[2]))
ids = list(range(10, 74))
n = int(sys.argv[3])
m.generate_tokens(ids, max_new_tokens=8, ignore_eos=True)
m.generate_tokens(ids, max_new_tokens=n, ignore_eos=True)
s = m.last_stats
print(json.dumps({"tok_s": s.decode_tok_s}))
"""


def tree(work: Path, rev: str) -> Path:
    """A worktree of `rev` whose directory imports as the package (symlinks for package-dir)."""
    root = work / f"tree-{rev}"
    if not root.is_dir():
        subprocess.run(["git", "-C", str(HERE), "worktree", "add", "--detach", str(root), rev], check=True,
                       capture_output=True)
    pkg = work / f"pkg-{rev}"
    if not pkg.is_dir():
        pkg.mkdir(parents=True)
        (pkg / "edgeloop").symlink_to(root / "edgeloop")
    for sub, target in (("compiler", root / "compiler"), ("runtimes", root / "runtimes")):
        link = root / "edgeloop" / sub
        if not link.exists():
            link.symlink_to(target)
    return pkg


# the editable install's import hook would find this checkout first: drop it, then import from the tree
PREAMBLE = """import sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path.insert(0, {path!r})
import edgeloop
assert edgeloop.__file__.startswith({path!r}), edgeloop.__file__
"""


def run(pythonpath: Path | None, code: str, *args: str) -> str:
    env = dict(os.environ)
    if pythonpath is not None:
        code = PREAMBLE.format(path=str(pythonpath)) + code
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-2000:])
    return r.stdout


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="git revision to compare against")
    p.add_argument("--model", type=Path, default=HERE / "examples" / "kjv-tiny")
    p.add_argument("--loops", type=int, default=4)
    p.add_argument("--lora-rank", default="32")
    p.add_argument("--compile", default="", help="extra `edgeloop compile` options, e.g. '--quant int4'")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("/tmp/commits"))
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    sides = {"base " + a.base: tree(a.work, a.base), "this checkout": None}
    artifacts = {}
    for name, path in sides.items():
        tag = "base" if path is not None else "head"
        md, art = a.work / f"{tag}-md", a.work / f"{tag}-art"
        convert = (f"import edgeloop; edgeloop.convert({str(a.model)!r}, {str(md)!r}, loops={a.loops}, "
                   f"lora_rank={a.lora_rank!r}, overwrite=True)")
        run(path, convert)
        cli = ("import sys; from edgeloop.cli import main; sys.argv = ['edgeloop', 'compile', sys.argv[1], '-o', "
               "sys.argv[2], '--force', *sys.argv[3:]]; main()")
        run(path, cli, str(md), str(art), *shlex.split(a.compile))
        artifacts[name] = art
    samples = {name: [] for name in sides}
    for r in range(a.rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(list(sides)))
        for name in order:
            out = run(sides[name], MEASURE, str(artifacts[name]), str(a.threads), str(a.tokens))
            samples[name].append(json.loads(out.strip().splitlines()[-1])["tok_s"])
        print(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in samples.items()),
              file=sys.stderr)
    base, head = (statistics.median(v) for v in samples.values())
    print(f"\n{a.model.name}, B = {a.loops}, rank {a.lora_rank}, compile {a.compile or '(defaults)'}, "
          f"{a.threads} threads, {a.tokens} tokens, median of {a.rounds} alternating rounds\n")
    print("| code | decode tok/s (median) | min | max |")
    print("|---|---:|---:|---:|")
    for name, v in samples.items():
        print(f"| {name} | {statistics.median(v):.1f} | {min(v):.1f} | {max(v):.1f} |")
    print(f"\nthis checkout / base: {head / base:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
