"""``btlm run`` / ``python -m btlm.run``: train and evaluate Model Zoo BTLM configs on CPU or GPU(s).

The Model Zoo command line, without the Cerebras wheel::

    btlm run CPU --mode train --params configs/params_btlm_2p7b_2k.yaml --model_dir runs/btlm
    btlm run GPU --mode eval  --params configs/params_btlm_2p7b_2k.yaml --model_dir runs/btlm
    torchrun --nproc_per_node=8 -m btlm.run GPU --mode train --params ... --model_dir ...
"""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Train / evaluate a Cerebras Model Zoo BTLM params YAML (Release 2.0-2.1 layout) with PyTorch.

Re-running the same train command resumes from the newest checkpoint_<step>.mdl in --model_dir.
Outputs: <model_dir>/checkpoint_<step>.mdl, <model_dir>/<mode>/{params_<mode>.yaml,run.log,TensorBoard}.
Data-parallel: launch under torchrun (DDP, or FSDP2 with runconfig.distributed_strategy: fsdp), or set
runconfig.enable_distributed: True on a GPU machine to use every local GPU.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="btlm run", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target_device", choices=["CPU", "GPU"], help="where to run (CSX is Cerebras-only)")
    parser.add_argument("-p", "--params", required=True, help="params YAML (train_input/eval_input/model/optimizer/runconfig)")
    parser.add_argument("-m", "--mode", required=True, choices=["train", "eval", "eval_all", "train_and_eval"],
                        help="train; eval one checkpoint; eval_all checkpoints in model_dir; train_and_eval")
    parser.add_argument("-o", "--model_dir", default=None,
                        help="output directory for checkpoints and logs (default: runconfig.model_dir or ./model_dir)")
    parser.add_argument("--checkpoint_path", default=None,
                        help="checkpoint to start from (default: the newest in model_dir)")
    parser.add_argument("--load_checkpoint_states", default=None,
                        help="comma list of states to load: model,optimizer,dataloader,grad_scaler,lr_scheduler,"
                             "global_step (default: all; 'model' = fine-tune from the weights only)")
    parser.add_argument("--disable_strict_checkpoint_loading", action="store_true", default=None,
                        help="load model weights with strict=False (missing / extra keys allowed)")
    parser.add_argument("--logging", default=None, help="log level (DEBUG, INFO, WARNING, ...; default INFO)")
    parser.add_argument("--max_steps", type=int, default=None, help="train until this global step")
    parser.add_argument("--eval_steps", type=int, default=None, help="number of eval batches")
    parser.add_argument("--num_steps", type=int, default=None, help="train this many steps from the current one")
    parser.add_argument("--num_epochs", type=int, default=None, help="train this many passes over the data")
    parser.add_argument("--dist_backend", choices=["nccl", "gloo", "mpi"], default=None,
                        help="torch.distributed backend (default: nccl on GPU, gloo on CPU)")
    parser.add_argument("--init_method", default=None, help="torch.distributed init method (default env://)")
    return parser


_CLI_TO_RUNCONFIG = ("mode", "model_dir", "checkpoint_path", "load_checkpoint_states",
                     "disable_strict_checkpoint_loading", "logging", "max_steps", "eval_steps", "num_steps",
                     "num_epochs", "dist_backend", "init_method", "target_device")


def merge_cli(raw: dict, args: argparse.Namespace) -> dict:
    """Model Zoo merge rule: a CLI value, when given, overrides ``runconfig``; otherwise the YAML's stands."""
    raw = dict(raw)
    rc = dict(raw.get("runconfig") or {})
    for key in _CLI_TO_RUNCONFIG:
        value = getattr(args, key, None)
        if value is not None:
            rc[key] = value
    rc.setdefault("model_dir", "./model_dir")
    raw["runconfig"] = rc
    return raw


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """Validate, set up (distributed) and dispatch one mode. Errors propagate to :func:`main`."""
    import torch

    from btlm.train import distributed as D
    from btlm.train.config import load_params, parse_params
    from btlm.train.trainer import Runner

    _, raw = load_params(args.params)
    raw = merge_cli(raw, args)
    params = parse_params(raw, args.params)
    rc = params.runconfig

    if rc.enable_distributed and not D.launched_by_torchrun():
        if args.target_device == "GPU" and torch.cuda.device_count() > 1:
            return D.relaunch_with_torchrun(argv, torch.cuda.device_count())
        print("btlm run: enable_distributed with a single local device: running one process "
              "(launch under torchrun --nproc_per_node=N for N processes)", file=sys.stderr)
    env = D.init_distributed(args.target_device, rc.dist_backend, rc.init_method, rc.distributed_strategy,
                             rc.dist_timeout_minutes)
    try:
        runner = Runner(params, raw, rc.model_dir, args.target_device, env)
        if args.mode == "train":
            runner.train()
        elif args.mode == "eval":
            runner.evaluate()
        elif args.mode == "eval_all":
            runner.evaluate_all()
        else:
            runner.train_and_eval()
    finally:
        if env.world_size > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from btlm.data import DataError
    from btlm.train.checkpoint import CheckpointError
    from btlm.train.config import ConfigError
    from btlm.train.trainer import TrainingError

    try:
        return run(args, argv)
    except (ConfigError, CheckpointError, TrainingError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted (the last checkpoint written is intact)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
