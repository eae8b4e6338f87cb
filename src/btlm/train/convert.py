"""Training checkpoints ↔ the released Hugging Face layout (``btlm convert``).

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

import tempfile
from pathlib import Path

import yaml

from .checkpoint import CheckpointError, atomic_torch_save, load_checkpoint_file


def read_training_checkpoint(path: str | Path, allow_unpickle: bool = False) -> dict:
    """A ``.mdl`` file (weights_only-safe) or, with ``allow_unpickle``, a ``.dcp`` directory (whose
    ``.metadata`` is a pickle) as one full, CPU state dict."""
    path = Path(path)
    if path.is_dir():
        if not allow_unpickle:
            raise CheckpointError(f"{path} is a torch.distributed.checkpoint directory, whose .metadata is a pickle "
                                  "that can run code; pass --allow-unpickle to convert it (only if you wrote it)")
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        if not (path / ".metadata").is_file():
            raise CheckpointError(f"{path}: not a torch.distributed.checkpoint directory (no .metadata)")
        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(str(path), str(Path(tmp) / "full.pt"))
            state = load_checkpoint_file(Path(tmp) / "full.pt")
        state.update(load_checkpoint_file(path / "extra.pt"))
        return state
    return load_checkpoint_file(path)


def checkpoint_to_hf(checkpoint: str | Path, out_dir: str | Path, params_path: str | Path | None = None,
                     overwrite: bool = False, allow_unpickle: bool = False) -> Path:
    """Write the model of a training checkpoint in the released HF layout (via :func:`btlm.io.save_model`).

    ``out_dir`` must be new or empty unless ``overwrite`` (which replaces only model files: a run
    directory's checkpoints and logs stay); ``allow_unpickle`` is needed for a ``.dcp`` directory."""
    from btlm.io import check_output_dir, save_model
    from btlm.model import BTLMLMHeadModel

    from .config import load_params, parse_params
    from .modeling import btlm_config_from_params

    check_output_dir(out_dir, overwrite)
    state = read_training_checkpoint(checkpoint, allow_unpickle)
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
    return save_model(model, out_dir, overwrite=overwrite)


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


def hf_to_checkpoint(model_dir: str | Path, out: str | Path, params_out: str | Path | None = None,
                     overwrite: bool = False) -> Path:
    """HF model directory → ``{"model", "global_step": 0, "__metadata__"}`` checkpoint (fp32 weights).

    ``out`` (and ``params_out``) must not exist unless ``overwrite``."""
    import torch

    from btlm.io import atomic_write, check_output_file, load_model

    check_output_file(out, overwrite)
    if params_out is not None:
        check_output_file(params_out, overwrite)
    model = load_model(str(model_dir), dtype=torch.float32)
    sections = hf_config_to_params(model.config)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({"model": state, "global_step": 0,
                       "__metadata__": [{"format_version": 1, "model_name": "BTLMLMHeadModel",
                                         "source": str(model_dir), "params": sections}]}, out)
    if params_out is not None:
        atomic_write(params_out, yaml.safe_dump(sections, sort_keys=False))
    return out
