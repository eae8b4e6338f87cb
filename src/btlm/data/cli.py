"""``btlm data``: ``LMData`` (raw text → HDF5 shards), ``inspect DIR``, ``shuffle IN OUT --seed S``."""

from __future__ import annotations

import argparse
import json
import sys

from btlm.data.readers import DataError

USAGE = """usage: btlm data {LMData,inspect,shuffle} ...

  LMData ...                 raw text (.txt/.jsonl/.jsonl.zst/.jsonl.gz/.parquet) -> [n, 3, msl] int32 .h5 shards
                             (Cerebras Model Zoo create_hdf5_dataset.py flags; btlm data LMData --help)
  inspect DIR                counts, token statistics and a decoded row of a shard directory
  shuffle IN OUT --seed S    global offline shuffle of all rows across shards (like h5_dataset_shuffle.py)"""


def _inspect(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="btlm data inspect", description="Summarise a directory of .h5 shards.")
    ap.add_argument("data_dir")
    ap.add_argument("--row", type=int, default=0, help="which row to decode (default 0)")
    ap.add_argument("--top", type=int, default=10, help="how many most frequent tokens to list")
    ap.add_argument("--json", action="store_true", help="print the statistics as JSON")
    args = ap.parse_args(argv)
    from btlm.data.tools import format_inspect, inspect_dir

    info = inspect_dir(args.data_dir, args.row, args.top)
    print(json.dumps(info, indent=2, ensure_ascii=False) if args.json else format_inspect(info))
    return 0


def _shuffle(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="btlm data shuffle",
                                 description="Shuffle every row of IN's .h5 shards (searched recursively) into OUT.")
    ap.add_argument("input_dir")
    ap.add_argument("output_dir")
    ap.add_argument("--seed", type=int, required=True, help="seed of the shuffle (same seed, same output)")
    ap.add_argument("--num_output_chunks", type=int, default=None, help="output files (default: as many as inputs)")
    ap.add_argument("--compression", choices=("gzip", "lzf", "none"), default="gzip")
    ap.add_argument("--display_pbar", action="store_true", help="show progress")
    args = ap.parse_args(argv)
    from btlm.data.tools import shuffle_dir

    info = shuffle_dir(args.input_dir, args.output_dir, args.seed, args.num_output_chunks, args.compression,
                       args.display_pbar)
    print(f"shuffled {info['rows']} rows from {info['input_files']} files into {info['num_output_chunks']} files "
          f"in {args.output_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "LMData":
        from btlm.data.create_hdf5_dataset import main as lmdata

        return lmdata(argv, prog="btlm data")
    if cmd in ("Summarization", "FIM", "LMData_VSL", "Summarization_VSL", "Customize"):
        print(f"error: mode {cmd} is not supported (only LMData, which BTLM's data uses)", file=sys.stderr)
        return 2
    handlers = {"inspect": _inspect, "shuffle": _shuffle}
    if cmd not in handlers:
        print(f"error: unknown data command {cmd!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        return handlers[cmd](rest)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
