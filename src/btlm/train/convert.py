"""``btlm convert``: training checkpoints ↔ the released Hugging Face layout.

* ``btlm convert to-hf CHECKPOINT OUT_DIR`` — a ``checkpoint_<step>.mdl`` (or FSDP2 ``.dcp`` directory)
  → ``model.safetensors`` + ``config.json`` + tokenizer, loadable with
  ``AutoModelForCausalLM.from_pretrained(OUT_DIR)`` (after ``import btlm``).
* ``btlm convert from-hf MODEL_DIR OUT.mdl [--params-out model.yaml]`` — HF weights (e.g. the released
  ``cerebras/btlm-3b-8k-base``) → a checkpoint to start training from with
  ``btlm run ... --checkpoint_path OUT.mdl --load_checkpoint_states model``; ``--params-out`` writes the
  matching ``model:`` section (and ``adjust_learning_rate``) for the params YAML.

Training checkpoints already use the HF parameter names, so conversion is a copy plus the config.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import yaml

from .checkpoint import CheckpointError, atomic_torch_save, load_checkpoint_file


def read_training_checkpoint(path: str | Path) -> dict:
    """A ``.mdl`` file or a ``.dcp`` directory as one full, CPU state dict (weights_only-safe)."""
    path = Path(path)
    if path.is_dir():
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        if not (path / ".metadata").is_file():
            raise CheckpointError(f"{path}: not a torch.distributed.checkpoint directory (no .metadata)")
        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(str(path), str(Path(tmp) / "full.pt"))
            state = load_checkpoint_file(Path(tmp) / "full.pt")
        state.update(load_checkpoint_file(path / "extra.pt"))
        return state
    return load_checkpoint_file(path)


def checkpoint_to_hf(checkpoint: str | Path, out_dir: str | Path, params_path: str | Path | None = None) -> Path:
    """Write the model of a training checkpoint in the released HF layout (via ``btlm.inference.save_model``)."""
    from btlm.inference import save_model
    from btlm.model import BTLMLMHeadModel

    from .config import load_params, parse_params
    from .modeling import btlm_config_from_params

    state = read_training_checkpoint(checkpoint)
    if params_path is not None:
        params, _ = load_params(params_path)
    else:
        try:
            raw = state["__metadata__"][0]["params"]
        except (KeyError, IndexError, TypeError):
            raise CheckpointError(f"{checkpoint}: no params stored in the checkpoint; pass --params YAML") from None
        params = parse_params(raw, f"{checkpoint} (stored params)")
    config = btlm_config_from_params(params.model, params.optimizer, use_cache=True)
    model = BTLMLMHeadModel(config)
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to transformer.wte.weight
    if missing or unexpected:
        raise CheckpointError(f"{checkpoint}: weights do not match the params' model: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    return save_model(model, out_dir)


def hf_config_to_params(config) -> dict:
    """The ``model:`` section (and ``optimizer.adjust_learning_rate``) equivalent to an HF ``BTLMConfig``."""
    width = float(config.mup_width_scale)
    model = {
        "hidden_size": config.n_embd, "num_hidden_layers": config.n_layer, "num_heads": config.n_head,
        "filter_size": config.n_inner or 4 * config.n_embd, "vocab_size": config.vocab_size,
        "max_position_embeddings": config.n_positions, "position_embedding_type": config.position_embedding_type,
        "share_embedding_weights": True, "nonlinearity": config.activation_function,
        "dropout_rate": config.resid_pdrop, "embedding_dropout_rate": config.embd_pdrop,
        "attention_dropout_rate": config.attn_pdrop, "layer_norm_epsilon": config.layer_norm_epsilon,
        "attention_type": "scaled_dot_product" if config.scale_attn_weights else "dot_product",
        "scale_qk_dot_by_d": bool(config.mup_scale_qk_dot_by_d),
        "scale_qk_dot_by_layer_idx": bool(config.scale_attn_by_inverse_layer_idx),
        "embeddings_scale": float(config.mup_embeddings_scale),
        "output_logits_scale": float(config.mup_output_alpha) * width,
        "initializer_range": float(config.initializer_range),
        "loss_scaling": "batch_size", "loss_weight": 1.0 / config.n_positions,
    }
    scaling = config.alibi_scaling or {}
    if "factor" in scaling:
        model["pos_scaling_factor"] = float(scaling["factor"])
    elif scaling:
        raise CheckpointError("alibi_scaling with train_seq_len (dynamic interpolation) has no training equivalent; "
                              "use a fixed factor")
    return {"model": model, "optimizer": {"adjust_learning_rate": {"decoder_kernel": width}}}


def hf_to_checkpoint(model_dir: str | Path, out: str | Path, params_out: str | Path | None = None) -> Path:
    """HF model directory → ``{"model", "global_step": 0, "__metadata__"}`` checkpoint (fp32 weights)."""
    import torch

    from btlm.inference import load_model

    model = load_model(str(model_dir), dtype=torch.float32)
    sections = hf_config_to_params(model.config)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({"model": state, "global_step": 0,
                       "__metadata__": [{"format_version": 1, "model_name": "BTLMLMHeadModel",
                                         "source": str(model_dir), "params": sections}]}, out)
    if params_out is not None:
        Path(params_out).write_text(yaml.safe_dump(sections, sort_keys=False))
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="btlm convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    to_hf = sub.add_parser("to-hf", help="training checkpoint -> HF model directory")
    to_hf.add_argument("checkpoint", help="checkpoint_<step>.mdl file or checkpoint_<step>.dcp directory")
    to_hf.add_argument("out_dir", help="output directory (written atomically)")
    to_hf.add_argument("--params", default=None, help="params YAML (default: the params stored in the checkpoint)")
    from_hf = sub.add_parser("from-hf", help="HF model directory -> training checkpoint")
    from_hf.add_argument("model_dir", help="directory with config.json + weights (released layout)")
    from_hf.add_argument("out", help="output checkpoint file, e.g. runs/ft/checkpoint_0.mdl")
    from_hf.add_argument("--params-out", default=None, help="write the matching model:/optimizer: YAML sections here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from btlm.inference import ModelLoadError

    from .config import ConfigError

    try:
        if args.command == "to-hf":
            out = checkpoint_to_hf(args.checkpoint, args.out_dir, args.params)
        else:
            out = hf_to_checkpoint(args.model_dir, args.out, args.params_out)
    except (CheckpointError, ConfigError, ModelLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
