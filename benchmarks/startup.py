"""Start-up time of the command line: ``btlm --help``, ``btlm data LMData --help`` and everything
``btlm data LMData`` imports before it reads its first input file, each in a fresh process.

Targets: ``btlm --help`` < 0.3 s, ``btlm data`` start-up < 0.5 s. With ``--baseline REV`` the same
commands run on the source tree of git revision REV (extracted with ``git archive``) in the same
interleaved rounds, so the ratios compare like with like on a shared machine.

    python benchmarks/startup.py --baseline a36545d --out benchmarks/results/startup.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: name -> (code run now, code run on a baseline tree from before the lazy package root)
CASES = {
    "python -c pass": ("pass", "pass"),
    "btlm --help": ("from btlm.cli import main; main(['--help'])", "from btlm.cli import main; main(['--help'])"),
    "btlm data LMData --help": ("from btlm.cli import main; main(['data', 'LMData', '--help'])",
                                "from btlm.cli import main; main(['data', 'LMData', '--help'])"),
    "btlm data start-up (all imports before the first input file)": (
        "import btlm.cli, btlm.data.create_hdf5_dataset; btlm.cli.build_parser('data')",
        "import btlm.cli, btlm.data.cli, btlm.data.create_hdf5_dataset; btlm.data.create_hdf5_dataset.build_parser()"),
}


def _time(code: str, src: Path | None) -> float:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=True)
    return time.perf_counter() - t0


def _extract(rev: str, into: Path) -> Path:
    data = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds; best and median are reported")
    parser.add_argument("--baseline", default=None, help="git revision to compare with (its src/ tree)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "startup.md")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        base_src = _extract(args.baseline, Path(tmp)) if args.baseline else None
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for name, (now, before) in CASES.items():
                times.setdefault((name, "now"), []).append(_time(now, None))
                if base_src is not None:
                    times.setdefault((name, "baseline"), []).append(_time(before, base_src))
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = ["# Command-line start-up", "",
             "Wall time of a fresh `python -c ...` process per case (best and median of interleaved rounds). "
             "`btlm` imports neither torch nor transformers until a command needs them (lazy package root, "
             "parsers in `btlm.cli`), so help and the data pipeline start without them.", "",
             f"Command: `python benchmarks/startup.py{' --baseline ' + args.baseline if args.baseline else ''} "
             f"--out {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}`; "
             f"{args.rounds} rounds; load average at the end {load}.", "",
             "| case | now: best s | now: median s | " + ("baseline: best s | baseline: median s | baseline best / now best |"
                                                         if base_src else ""),
             "|---|---|---|" + ("---|---|---|" if base_src else "")]
    for name in CASES:
        now = times[(name, "now")]
        row = f"| {name} | {min(now):.3f} | {statistics.median(now):.3f} |"
        if base_src is not None:
            base = times[(name, "baseline")]
            row += f" {min(base):.3f} | {statistics.median(base):.3f} | {min(base) / min(now):.1f}× |"
        lines.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
