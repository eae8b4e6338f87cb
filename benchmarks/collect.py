"""Rebuild BENCHMARKS.md from the per-benchmark result files in benchmarks/results/.

Each benchmark script writes its own ``benchmarks/results/<name>.md`` (table, notes and the command that
produced it); this joins them in pipeline order under one header, so BENCHMARKS.md never drifts from
the results.

    python benchmarks/collect.py            # writes BENCHMARKS.md at the repository root
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
#: pipeline order; any other result file follows in name order
ORDER = ["attention", "train_step", "train_memory", "gpu_check", "data_prep", "memory", "decode", "quant_quality", "long_context"]

HEADER = """# Benchmarks

Each section is produced by the script and command it shows (`benchmarks/*.py`, results in
`benchmarks/results/`, joined here by `python benchmarks/collect.py`) on this project's 2-core CPU
machines (24 GiB, no GPU): the earlier sections on an AVX2 CPU, the sections that name their CPU
capability (memory, decode, training step dtypes, training memory, serve, fine-tune) on an AVX-512 +
AMX CPU, often while other jobs shared it: compare the ratios to the baseline and to the roofline
measured in the same run, not the absolute figures. The "GPU check" section ran on one lent NVIDIA H200.
"""


def section(path: Path) -> str:
    """A result file as a level-2 section, with its image links made relative to the repository root."""
    text = path.read_text()
    text = re.sub(r"^# ", "## ", text, flags=re.M)
    return re.sub(r"\]\((?!https?:|/)([^)]+\.(?:png|svg))\)", lambda m: f"](benchmarks/results/{m.group(1)})", text)


def main() -> int:
    files = sorted(RESULTS.glob("*.md"), key=lambda p: (ORDER.index(p.stem) if p.stem in ORDER else len(ORDER), p.stem))
    if not files:
        print(f"error: no result files in {RESULTS}", file=sys.stderr)
        return 1
    out = ROOT / "BENCHMARKS.md"
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text(HEADER + "".join("\n" + section(f).rstrip() + "\n" for f in files))
    os.replace(tmp, out)
    print(f"wrote {out} from {', '.join(f.name for f in files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
