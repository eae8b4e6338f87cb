"""``btlm data``: ``LMData`` (raw text → HDF5 shards), ``Summarization`` (prompt/completion pairs → HDF5
shards), ``inspect DIR``, ``shuffle IN OUT --seed S``.

Building these parsers imports neither torch nor transformers, so ``btlm data`` starts fast.
"""

from __future__ import annotations

import json

from btlm.cli.common import Parser, add_overwrite, add_progress, progress_enabled, str2bool

DESCRIPTION = """\
Prepare HDF5 training data in the Cerebras Model Zoo layout.

  LMData ...                 raw text (.txt/.jsonl/.jsonl.zst/.jsonl.gz/.parquet) -> [n, 3, msl] int32 .h5 shards
                             (the Model Zoo create_hdf5_dataset.py LMData flags)
  Summarization ...          prompt/completion jsonl/parquet -> one row per pair, loss only on the completion
                             (the Model Zoo Summarization flags: --prompt_key --completion_key --sep_token)
  inspect DIR                counts, token statistics and a decoded row of a shard directory
  shuffle IN OUT --seed S    global offline shuffle of all rows across shards (like h5_dataset_shuffle.py)

Of the Model Zoo modes LMData and Summarization are supported (FIM, *_VSL and Customize are not)."""


def _add_options(p, mode: str) -> None:
    """The Model Zoo flags of ``btlm data MODE`` (spelled as the Model Zoo does: snake_case), one a setting of
    its config class; the values are checked when the command runs, by the config."""
    from btlm.data.options import options_for, str2bool as data_str2bool

    p.add_argument("--params", help="YAML with setup / processing / dataset sections (command-line flags override it)")
    for key, setting in options_for(mode).items():
        if key == "display_pbar":
            continue
        typ = str2bool if setting.type is data_str2bool else setting.type  # the CLI's: a bare flag means True
        p.add_argument(f"--{key}", type=typ, default=None, help=f"{setting.help} (default: {setting.default})")
    add_progress(p, dest="display_pbar", aliases=("--display_pbar",))


def build_parser(name: str = "data") -> Parser:
    ap = Parser(prog="btlm data", description=DESCRIPTION)
    sub = ap.add_subparsers(dest="mode", required=True, metavar="{LMData,Summarization,inspect,shuffle}")
    p = sub.add_parser("LMData", help="raw text -> packed [n, 3, msl] int32 rows (input_ids, attention_mask, labels)",
                       description="Tokenize documents (+EOS), pack them into rows of max_seq_length and write .h5 "
                                   "shards plus data_params.json into --output_dir (refused if it already holds "
                                   "shards, unless resuming). Booleans take True/False or stand alone.")
    _add_options(p, "LMData")
    p = sub.add_parser("Summarization", help="prompt/completion pairs -> one [3, msl] row each, loss on the completion",
                       description="Tokenize each record's prompt and completion into one row "
                                   "'prompt [sep] completion EOS' (padded; the loss mask covers the completion and "
                                   "EOS), the Model Zoo SummarizationPreprocessor layout. Pairs longer than "
                                   "max_seq_length are skipped and counted, never truncated. Same output, "
                                   "--strict and resume behaviour as LMData.")
    _add_options(p, "Summarization")

    i = sub.add_parser("inspect", help="summarise a directory of .h5 shards",
                       description="Summarise a directory of .h5 shards: counts, token statistics, a decoded row.")
    i.add_argument("data_dir")
    i.add_argument("--row", type=int, default=0, help="which row to decode")
    i.add_argument("--top", type=int, default=10, help="how many most frequent tokens to list")
    i.add_argument("--json", action="store_true", help="print the statistics as JSON")

    s = sub.add_parser("shuffle", help="global shuffle of every row across shards",
                       description="Shuffle every row of IN's .h5 shards (searched recursively) into OUT.")
    s.add_argument("input_dir")
    s.add_argument("output_dir")
    s.add_argument("--seed", type=int, required=True, help="seed of the shuffle (same seed, same output)")
    s.add_argument("--num-output-chunks", type=int, default=None, help="output files (default: as many as inputs)")
    s.add_argument("--compression", choices=("gzip", "lzf", "none"), default="gzip", help="HDF5 compression")
    add_overwrite(s)
    add_progress(s, aliases=("--display_pbar",))
    return ap


def execute(name: str, args) -> int:
    if args.mode in ("LMData", "Summarization"):
        from btlm.data.create_hdf5_dataset import run
        from btlm.data.options import load_config, options_for

        cfg = load_config(args.params, {k: getattr(args, k) for k in options_for(args.mode)}, args.mode)
        if cfg.display_pbar is None:
            cfg.display_pbar = progress_enabled(None)
        params = run(cfg)
        pp, st = params["post-process"], params["h5_dataset_stats"]
        what = "pairs" if args.mode == "Summarization" else "documents"
        print(f"wrote {pp['n_shards']} shards, {pp['n_examples']} sequences of {cfg.max_seq_length} tokens to "
              f"{cfg.output_dir} ({pp['documents']} {what}, {pp['tokens']} tokens, loss on "
              f"{st['loss_valid_tokens']}, {pp['seconds']:.1f} s)")
        if pp["discarded"]:
            print(f"discarded records: {pp['discarded']} (first ones listed under 'problems' in data_params.json)")
        return 0
    if args.mode == "inspect":
        from btlm.data.tools import format_inspect, inspect_dir

        info = inspect_dir(args.data_dir, args.row, args.top)
        print(json.dumps(info, indent=2, ensure_ascii=False) if args.json else format_inspect(info))
        return 0
    from btlm.data.tools import shuffle_dir

    info = shuffle_dir(args.input_dir, args.output_dir, args.seed, args.num_output_chunks, args.compression,
                       progress_enabled(args.progress), overwrite=args.overwrite)
    print(f"shuffled {info['rows']} rows from {info['input_files']} files into {info['num_output_chunks']} files "
          f"in {args.output_dir}")
    return 0
