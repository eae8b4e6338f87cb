"""``btlm convert to-hf`` / ``btlm convert from-hf``."""

from __future__ import annotations

from btlm.cli.common import Parser, add_overwrite

DESCRIPTION = """\
Convert training checkpoints to / from the released Hugging Face layout.

  btlm convert to-hf CHECKPOINT OUT_DIR [--tokenizer DIR]
      checkpoint_<step>.mdl (or an FSDP2 .dcp directory, with --allow-unpickle) -> model.safetensors +
      config.json + tokenizer, loadable with AutoModelForCausalLM.from_pretrained(OUT_DIR) after import btlm;
      bos/eos ids come from the training data's data_params.json (else the tokenizer); the tokenizer bundled
      is --tokenizer DIR or GPT-2's, and only one whose ids fit the model's vocab_size. A LoRA run's checkpoint
      (model.lora_params) gives its adapter in PEFT's format (adapter_config.json + adapter_model.safetensors,
      for PeftModel.from_pretrained on the base model), or with --merge-lora the merged model
  btlm convert from-hf MODEL_DIR OUT.mdl [--params-out model.yaml [--msl N]]
      HF weights (e.g. cerebras/btlm-3b-8k-base) -> a checkpoint to start training from with
      btlm run ... --checkpoint-path OUT.mdl --load-checkpoint-states model; --params-out writes the matching
      model: section (and adjust_learning_rate) for the params YAML

Training checkpoints already use the HF parameter names, so conversion is a copy plus the config."""


def build_parser(name: str = "convert") -> Parser:
    parser = Parser(prog="btlm convert", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{to-hf,from-hf}")
    to_hf = sub.add_parser("to-hf", help="training checkpoint -> HF model directory",
                           description="Write the model of a training checkpoint in the released HF layout.")
    to_hf.add_argument("checkpoint", help="checkpoint_<step>.mdl file or checkpoint_<step>.dcp directory")
    to_hf.add_argument("out_dir", help="output directory (new or empty unless --overwrite; written atomically)")
    to_hf.add_argument("--params", default=None, help="params YAML (default: the params stored in the checkpoint)")
    to_hf.add_argument("--tokenizer", default=None, metavar="DIR",
                       help="tokenizer directory to bundle (default: GPT-2's, when it fits the model's vocab_size)")
    to_hf.add_argument("--allow-unpickle", action="store_true",
                       help="allow a .dcp directory, whose .metadata is a pickle that can run code (only your own)")
    to_hf.add_argument("--merge-lora", action="store_true",
                       help="LoRA run's checkpoint: write the merged model (released layout) instead of the adapter")
    add_overwrite(to_hf)
    from_hf = sub.add_parser("from-hf", help="HF model directory -> training checkpoint",
                             description="Write HF weights as a training checkpoint (fp32).")
    from_hf.add_argument("model_dir", help="directory with config.json + weights (released layout)")
    from_hf.add_argument("out", help="output checkpoint file, e.g. runs/ft/checkpoint_0.mdl")
    from_hf.add_argument("--params-out", default=None, help="write the matching model:/optimizer: YAML sections here")
    from_hf.add_argument("--msl", type=int, default=None,
                         help="max_seq_length of the data to train on: --params-out then sets loss_scaling: "
                              "batch_size, loss_weight: 1/msl (default: both left out)")
    add_overwrite(from_hf)
    return parser


def execute(name: str, args) -> int:
    import sys

    from btlm.errors import UsageError
    from btlm.train.convert import checkpoint_to_hf, hf_to_checkpoint

    if args.command == "to-hf":
        out = checkpoint_to_hf(args.checkpoint, args.out_dir, args.params, args.tokenizer, overwrite=args.overwrite,
                               allow_unpickle=args.allow_unpickle, log=lambda m: print(f"note: {m}", file=sys.stderr),
                               merge_lora=args.merge_lora)
    else:
        if args.msl is not None and args.params_out is None:
            raise UsageError("--msl only sets loss_weight in --params-out; pass --params-out too")
        out = hf_to_checkpoint(args.model_dir, args.out, args.params_out, args.msl, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0
