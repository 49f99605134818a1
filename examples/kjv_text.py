"""The King James Bible as plain text, split as the bundled model was trained: the text to uptrain
on and the held-out books (James .. Revelation) it never saw.

    python examples/kjv_text.py -o build/kjv      # -> build/kjv/kjv-train.txt, build/kjv/kjv-heldout.txt

Needs Debian's `bible-kjv` package (the `bible` command), or `--text-file` with the dump.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_tiny import load_raw_text, parse_lines, split_heldout  # noqa: E402  (one definition of the split)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--out", type=Path, required=True)
    p.add_argument("--text-file", type=Path, help="a `bible -f Gen1:1-Rev22:21` dump (default: run `bible`)")
    p.add_argument("--heldout-frac", type=float, default=0.03)
    a = p.parse_args()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgeloop" / "kjv.txt"
    train, heldout = split_heldout(parse_lines(load_raw_text(a.text_file, cache)), a.heldout_frac)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "kjv-train.txt").write_text(train, encoding="utf-8")
    (a.out / "kjv-heldout.txt").write_text(heldout, encoding="utf-8")
    print(f"{a.out}/kjv-train.txt ({len(train):,} chars), {a.out}/kjv-heldout.txt ({len(heldout):,} chars)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
