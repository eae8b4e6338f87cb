"""``btlm run``: train and evaluate Model Zoo BTLM configs on CPU or GPU(s).

The Model Zoo command line, without the Cerebras wheel (``python -m btlm run`` is the same command,
for ``torchrun``)."""

from __future__ import annotations

from btlm.cli.common import Parser, add_progress

DESCRIPTION = """\
Train / evaluate a Cerebras Model Zoo BTLM params YAML (Release 2.0-2.1 layout) with PyTorch.

  btlm run CPU --mode train --params configs/params_btlm_2p7b_2k.yaml --model-dir runs/btlm
  btlm run GPU --mode eval  --params configs/params_btlm_2p7b_2k.yaml --model-dir runs/btlm
  torchrun --nproc_per_node=8 -m btlm run GPU --mode train --params ... --model-dir ...

Re-running the same train command resumes from the newest checkpoint_<step>.mdl in --model-dir; one train
run at a time may use a model_dir (a second one is refused, naming the first one's pid).
Outputs: <model_dir>/checkpoint_<step>.mdl, <model_dir>/<mode>/{params_<mode>.yaml,run.log,TensorBoard}.
Data-parallel: launch under torchrun (DDP, or FSDP2 with runconfig.distributed_strategy: fsdp), or set
runconfig.enable_distributed: True on a GPU machine to use every local GPU.
FSDP2 checkpoints (checkpoint_<step>.dcp/) hold a pickle (torch.distributed.checkpoint's .metadata): they are
loaded only with --allow-unpickle, for directories you wrote yourself."""


def build_parser(name: str = "run") -> Parser:
    p = Parser(prog="btlm run", description=DESCRIPTION)
    p.add_argument("target_device", choices=["CPU", "GPU"], help="where to run (CSX is Cerebras-only)")
    p.add_argument("-p", "--params", required=True, help="params YAML (train_input/eval_input/model/optimizer/runconfig)")
    p.add_argument("-m", "--mode", required=True, choices=["train", "eval", "eval_all", "train_and_eval"],
                   help="train; eval one checkpoint; eval_all checkpoints in model_dir; train_and_eval")
    p.add_argument("-o", "--model-dir", default=None,
                   help="output directory for checkpoints and logs (default: runconfig.model_dir or ./model_dir)")
    p.add_argument("--checkpoint-path", default=None, help="checkpoint to start from (default: the newest in model_dir)")
    p.add_argument("--load-checkpoint-states", default=None,
                   help="comma list of states to load: model,optimizer,dataloader,grad_scaler,lr_scheduler,"
                        "global_step (default: all; 'model' = fine-tune from the weights only)")
    p.add_argument("--disable-strict-checkpoint-loading", action="store_true", default=None,
                   help="load model weights with strict=False (missing / extra keys allowed)")
    p.add_argument("--allow-unpickle", action="store_true", default=None,
                   help="allow loading FSDP2 checkpoint_<step>.dcp directories, whose .metadata is a pickle that "
                        "can run code: only for directories you wrote yourself")
    p.add_argument("--logging", default=None, help="log level (DEBUG, INFO, WARNING, ...; default INFO)")
    p.add_argument("--max-steps", type=int, default=None, help="train until this global step")
    p.add_argument("--eval-steps", type=int, default=None, help="number of eval batches")
    p.add_argument("--num-steps", type=int, default=None, help="train this many steps from the current one")
    p.add_argument("--num-epochs", type=int, default=None, help="train this many passes over the data")
    p.add_argument("--dist-backend", choices=["nccl", "gloo", "mpi"], default=None,
                   help="torch.distributed backend (default: nccl on GPU, gloo on CPU)")
    p.add_argument("--init-method", default=None, help="torch.distributed init method (default env://)")
    add_progress(p)
    return p


def execute(name: str, args) -> int:
    from btlm.train.launch import RUNCONFIG_OVERRIDES, run

    overrides = {k: getattr(args, k, None) for k in RUNCONFIG_OVERRIDES}
    return run(args.params, args.target_device, args.mode, overrides, _argv(args, overrides), args.progress)


def _argv(args, overrides: dict) -> list[str]:
    """The command line again (for the torchrun relaunch), from the parsed values."""
    argv = [args.target_device, "--params", args.params, "--mode", args.mode]
    for key, value in overrides.items():
        if value is not None and key not in ("mode", "target_device"):
            argv += [f"--{key.replace('_', '-')}", str(value)]
    if args.progress is not None:
        argv += ["--progress", str(args.progress)]
    return argv
