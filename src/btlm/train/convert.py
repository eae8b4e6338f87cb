"""Training checkpoints ↔ the released Hugging Face layout (``btlm convert``).

* ``btlm convert to-hf CHECKPOINT OUT_DIR [--tokenizer DIR]`` — a ``checkpoint_<step>.mdl`` (or FSDP2
  ``.dcp`` directory) → ``model.safetensors`` + ``config.json`` + tokenizer, loadable with
  ``AutoModelForCausalLM.from_pretrained(OUT_DIR)`` (after ``import btlm``). ``bos/eos_token_id`` come
  from the training data (``data_params.json``'s ``eos_id`` next to the ``train_input`` shards), else
  from the tokenizer; the tokenizer bundled is ``--tokenizer DIR`` or GPT-2's, and only one whose ids
  all fit the model's ``vocab_size``.
  A LoRA run's checkpoint gives its adapter in PEFT's format (``PeftModel.from_pretrained``), or with
  ``--merge-lora`` the merged model in the released layout.
* ``btlm convert from-hf MODEL_DIR OUT.mdl [--params-out model.yaml [--msl N]]`` — HF weights (e.g. the
  released ``cerebras/btlm-3b-8k-base``) → a checkpoint to start training from with
  ``btlm run ... --checkpoint_path OUT.mdl --load_checkpoint_states model``; ``--params-out`` writes the
  matching ``model:`` section (and ``adjust_learning_rate``) for the params YAML.

Training checkpoints already use the HF parameter names, so conversion is a copy plus the config.
"""

from __future__ import annotations

import json
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


def training_data_eos_id(params) -> tuple[int | None, str | None]:
    """The EOS id the training data was prepared with: ``post-process.eos_id`` of the ``data_params.json``
    that ``btlm data`` (and the Model Zoo's ``create_hdf5_dataset.py``) writes next to the shards of
    ``train_input`` (its first ``data_dir`` / mixture entry). Returns ``(eos_id, file)`` or ``(None, None)``
    when no such file is found (paths are taken as the training run took them: relative to the cwd)."""
    section = params.train_input
    if section is None:
        return None, None
    dirs = section.data_dir if section.data_dir is not None else [m.get("data_dir") for m in section.mixture or []]
    dirs = [dirs] if isinstance(dirs, str) else [d for d in dirs if isinstance(d, str)]
    for d in dirs[:1]:
        path = Path(d) / "data_params.json"
        if not path.is_file():
            continue
        try:
            eos = json.loads(path.read_text(encoding="utf-8"))["post-process"]["eos_id"]
        except (OSError, ValueError, KeyError, TypeError):
            raise CheckpointError(f"{path}: not a data_params.json with post-process.eos_id") from None
        eos = eos[0] if isinstance(eos, list) and eos else eos
        if not isinstance(eos, int):
            raise CheckpointError(f"{path}: post-process.eos_id = {eos!r}, expected an integer")
        return eos, str(path)
    return None, None


def choose_tokenizer(vocab_size: int, tokenizer_dir: str | Path | None):
    """The tokenizer to bundle: ``tokenizer_dir`` (must fit ``vocab_size``), else GPT-2's when it fits.

    Returns ``(tokenizer or None, note)``; ``note`` says why none is bundled. A tokenizer fits when
    every id it can produce (``len(tokenizer)``) is below ``vocab_size``: the model may have a larger,
    padded embedding, never a smaller one.
    """
    from btlm.tokenizer import VOCAB_SIZE, load_tokenizer

    if tokenizer_dir is not None:
        try:
            tok = load_tokenizer(tokenizer_dir)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"--tokenizer {tokenizer_dir}: cannot load a tokenizer ({err})") from None
        if len(tok) > vocab_size:
            raise CheckpointError(f"--tokenizer {tokenizer_dir} has {len(tok)} tokens, more than the model's "
                                  f"vocab_size {vocab_size}: its ids would fall outside the embedding")
        return tok, None
    if VOCAB_SIZE > vocab_size:
        return None, (f"no tokenizer bundled: GPT-2's {VOCAB_SIZE} tokens do not fit the model's vocab_size "
                      f"{vocab_size}; pass --tokenizer DIR (the tokenizer the data was prepared with)")
    return load_tokenizer(), None


def special_token_ids(params, tokenizer, vocab_size: int) -> dict:
    """``bos/eos/pad_token_id`` for the exported config: the data's EOS, else the tokenizer's, else
    GPT-2's 50256 when it is inside the vocabulary (BTLM's convention: BOS = EOS, no pad)."""
    from btlm.tokenizer import EOS_ID

    data_eos, source = training_data_eos_id(params)
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    if data_eos is not None and tok_eos is not None and data_eos != tok_eos:
        raise CheckpointError(f"the tokenizer's eos id {tok_eos} differs from eos_id {data_eos} in {source} "
                              "(the data the model was trained on); pass --tokenizer with the data's tokenizer")
    eos = data_eos if data_eos is not None else tok_eos
    if eos is None and EOS_ID < vocab_size:
        eos = EOS_ID
    if eos is not None and not 0 <= eos < vocab_size:
        raise CheckpointError(f"eos id {eos} (from {source or 'the tokenizer'}) is outside the model's "
                              f"vocab_size {vocab_size}")
    bos = getattr(tokenizer, "bos_token_id", None)
    bos = bos if bos is not None and bos < vocab_size else eos
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None and pad < vocab_size else None
    return {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}


#: Files of a PEFT adapter directory (``save_pretrained``); ``--overwrite`` replaces these and nothing else.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")


def checkpoint_to_hf(checkpoint: str | Path, out_dir: str | Path, params_path: str | Path | None = None,
                     tokenizer_dir: str | Path | None = None, overwrite: bool = False, allow_unpickle: bool = False,
                     log=print, merge_lora: bool = False) -> Path:
    """Write the model of a training checkpoint in the released HF layout (via :func:`btlm.io.save_model`).

    Token ids and tokenizer: see :func:`special_token_ids` and :func:`choose_tokenizer`; ``log``
    receives the one-line note when no tokenizer is bundled. ``out_dir`` must be new or empty unless
    ``overwrite`` (which replaces only model files: a run directory's checkpoints and logs stay);
    ``allow_unpickle`` is needed for a ``.dcp`` directory.

    A LoRA run's checkpoint (params with ``model.lora_params``) gives its adapter in PEFT's format
    (``adapter_config.json`` + ``adapter_model.safetensors``, for ``PeftModel.from_pretrained(base, out_dir)``
    on the model the run started from); with ``merge_lora`` the merged model in the released layout instead
    (each adapted weight plus ``B·A·alpha/r``)."""
    from btlm.io import check_output_dir, save_model
    from btlm.model import BTLMLMHeadModel

    from .config import load_params, parse_params
    from .zoo_model import btlm_config_from_params

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
    vocab_size = params.model.vocab_size
    tokenizer, note = choose_tokenizer(vocab_size, tokenizer_dir)
    ids = special_token_ids(params, tokenizer, vocab_size)
    lora = params.model.lora_params
    if merge_lora and not lora:
        raise CheckpointError(f"--merge-lora: {checkpoint} is not from a LoRA run (its params have no "
                              "model.lora_params)")
    config = btlm_config_from_params(params.model, params.optimizer, use_cache=True, **ids)
    model = BTLMLMHeadModel(config)
    peft_model = None
    if lora:
        from .lora import peft_config, require_peft

        peft_model = require_peft().get_peft_model(model, peft_config(model, lora))  # injects into model
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to transformer.wte.weight
    if missing or unexpected:
        raise CheckpointError(f"{checkpoint}: weights do not match the params' model: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    if peft_model is not None and not merge_lora:
        from btlm.io import atomic_dir

        with atomic_dir(out_dir, overwrite=overwrite, owned=ADAPTER_FILES) as tmp:
            peft_model.save_pretrained(tmp)
        return Path(out_dir).absolute()
    if peft_model is not None:
        model = peft_model.merge_and_unload()
    if note:
        log(note)
    return save_model(model, out_dir, tokenizer=tokenizer if tokenizer is not None else False, overwrite=overwrite)


def hf_config_to_params(config, msl: int | None = None) -> dict:
    """The ``model:`` section (and ``optimizer.adjust_learning_rate``) equivalent to an HF ``BTLMConfig``.

    With ``msl`` (the sequence length of the data to train on) the loss is BTLM's Model Zoo form,
    ``loss_scaling: batch_size`` with ``loss_weight: 1/msl``. Without it both keys are left out: the
    right weight depends on the data, not on the model (``n_positions`` is 8192 for BTLM-3B-8k, and
    1/8192 at msl 128 would log a loss 64x too small); the default ``num_tokens`` scaling is the
    per-token mean at any msl.
    """
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
    }
    if msl is not None:
        if msl < 1:
            raise CheckpointError(f"--msl {msl}: expected the positive sequence length of the training data")
        model.update(loss_scaling="batch_size", loss_weight=1.0 / msl)
    scaling = config.alibi_scaling or {}
    if "factor" in scaling:
        model["pos_scaling_factor"] = float(scaling["factor"])
    elif scaling:
        raise CheckpointError("alibi_scaling with train_seq_len (dynamic interpolation) has no training equivalent; "
                              "use a fixed factor")
    return {"model": model, "optimizer": {"adjust_learning_rate": {"decoder_kernel": width}}}


def hf_to_checkpoint(model_dir: str | Path, out: str | Path, params_out: str | Path | None = None,
                     msl: int | None = None, overwrite: bool = False) -> Path:
    """HF model directory → ``{"model", "global_step": 0, "__metadata__"}`` checkpoint (fp32 weights).

    ``params_out`` gets the matching YAML sections (see :func:`hf_config_to_params` for ``msl``); ``out``
    (and ``params_out``) must not exist unless ``overwrite``."""
    import torch

    from btlm.io import atomic_write, check_output_file, load_model

    check_output_file(out, overwrite)
    if params_out is not None:
        check_output_file(params_out, overwrite)
    model = load_model(str(model_dir), dtype=torch.float32)
    sections = hf_config_to_params(model.config, msl)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({"model": state, "global_step": 0,
                       "__metadata__": [{"format_version": 1, "model_name": "BTLMLMHeadModel",
                                         "source": str(model_dir), "params": sections}]}, out)
    if params_out is not None:
        header = "" if msl is not None else (
            "# loss_scaling / loss_weight are left out: BTLM's Model Zoo form is loss_scaling: batch_size with\n"
            "# loss_weight: 1/<max_seq_length of your data> (rerun with --msl N to write it); the default\n"
            "# (num_tokens) is the per-token mean at any sequence length.\n")
        atomic_write(params_out, header + yaml.safe_dump(sections, sort_keys=False))
    return out
