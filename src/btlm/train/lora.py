"""LoRA in ``btlm run``: the Model Zoo ``model.lora_params`` (release 2.2+) on btlm's module tree, built on ``peft``.

``lora_params`` is one mapping or a list of them with Model Zoo's keys and defaults:

* ``r`` (rank; Model Zoo's default 0 adapts nothing, so btlm requires a positive rank), ``alpha``
  (default 1; the update is scaled by ``alpha / r``), ``dropout`` (default 0.0, applied to the adapter's
  input), ``merge_weights`` (default False) and ``fan_in_fan_out`` (default False).
* ``target_modules``: names that must *all* apply to a module for it to be adapted, Model Zoo's rule (there
  the names are the classes of the module and its ancestors, e.g. ``[MultiheadAttention]`` or
  ``[TransformerDecoderLayer, Linear]``); projection names (``c_attn``, ``c_proj``, ``c_fc``, ``c_fc2`` and
  Model Zoo's ``proj_*_dense_layer``) are alternatives to each other, as in peft: ``[c_attn, c_proj]`` adapts
  both, ``[attn, c_proj]`` the attention output only. (A module has one projection name, so no Model Zoo
  config changes meaning.) Missing or null: every decoder projection. With a list of
  mappings, each projection takes the first mapping that selects it (Model Zoo's order rule, so
  ``[{target_modules: [MultiheadAttention], r: 16}, {r: 4}]`` gives the attention rank 16 and the FFN rank 4).

Names a module answers to (:func:`module_names`): Model Zoo's class names of the GPT-2 model it corresponds
to, btlm's own class names and the attribute names on its path (``c_attn``, ``c_proj``, ``attn``, ``mlp``,
as in peft's ``target_modules``), and Model Zoo's attribute names of the attention projections. Model Zoo's
attention has separate q/k/v projections; btlm keeps the released layout's fused ``c_attn``, so
``proj_q_dense_layer``, ``proj_k_dense_layer`` and ``proj_v_dense_layer`` all name ``c_attn`` (one
adapter whose ``A`` is shared by q, k and v, where Model Zoo has three), ``proj_output_dense_layer`` the
attention's ``c_proj``. Only the decoder projections (``c_attn``, ``c_proj``, ``c_fc``, ``c_fc2``) are
adapted: the token embedding and the LM head are one tied matrix in the released layout, so an update of
either could not be merged into a model of that layout; names that select only them are refused, and the
class names that also cover them (``Linear``, the model's) select the decoder projections.

Accepted but without effect: ``merge_weights`` (Model Zoo folds the adapters into the weights in eval mode,
which changes no result; btlm evaluates the unmerged model, and ``btlm convert to-hf --merge-lora`` writes
the merged one) and ``fan_in_fan_out`` (the weight layout is the layer's: btlm's GPT-2 ``Conv1D``).

Adapters are peft LoRA layers injected into the model in place (``peft.inject_adapter_in_model``), so
the model keeps its class and the trainer, DDP and FSDP2 work as for a full run; the state-dict keys are
peft's (``...c_attn.base_layer.weight``, ``...c_attn.lora_A.default.weight``). Everything but the adapters
is frozen (the ALiBi slopes always are).
"""

from __future__ import annotations

import logging
import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from btlm.errors import BTLMError

logger = logging.getLogger("btlm.train")

LORA_KEYS = ("r", "alpha", "dropout", "merge_weights", "fan_in_fan_out", "target_modules")

#: The adaptable projections of a decoder block (attribute names).
ADAPTABLE = ("c_attn", "c_proj", "c_fc", "c_fc2")

#: Model Zoo's GPT-2 class names for btlm's classes (the module tree of both models corresponds one to one
#: down to the projections; Model Zoo's FFN is a ``FeedForwardNetwork`` of ``SingleFeedForwardLayer`` s).
MODEL_ZOO_CLASSES = {
    "BTLMLMHeadModel": ("GPT2LMHeadModel", "Gpt2Model"),
    "ModuleList": ("TransformerDecoder",),
    "BTLMBlock": ("TransformerDecoderLayer",),
    "BTLMAttention": ("MultiheadAttention",),
    "BTLMMLP": ("FeedForwardNetwork", "SingleFeedForwardLayer"),
    "Conv1D": ("Linear",),
    "Linear": ("Linear",),
}
#: Model Zoo's attribute names of the attention projections → btlm's (q, k and v are one fused ``c_attn``).
MODEL_ZOO_ATTENTION = {"proj_q_dense_layer": "c_attn", "proj_k_dense_layer": "c_attn",
                       "proj_v_dense_layer": "c_attn", "proj_output_dense_layer": "c_proj"}
FUSED_QKV = frozenset(n for n, b in MODEL_ZOO_ATTENTION.items() if b == "c_attn")

#: Names of one projection each: alternatives within a ``target_modules`` list.
PROJECTION_NAMES = frozenset({*ADAPTABLE, *MODEL_ZOO_ATTENTION})
#: Every name a decoder projection answers to (the valid ``target_modules`` entries).
VALID_NAMES = frozenset(
    {"transformer", "h", "attn", "mlp", *ADAPTABLE, "BTLMModel", *MODEL_ZOO_CLASSES, *MODEL_ZOO_ATTENTION}
    | {alias for aliases in MODEL_ZOO_CLASSES.values() for alias in aliases})
#: Names that select only the tied token embedding / LM head (refused with their own message).
TIED_NAMES = frozenset({"wte", "wpe", "lm_head", "Embedding", "EmbeddingLayer"})


class LoraGroup(BaseModel):
    """One ``lora_params`` mapping (Model Zoo's ``LoraConfig`` keys and defaults)."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(0, validate_default=True)
    alpha: Annotated[float, Field(gt=0)] = 1.0
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    merge_weights: bool = False
    fan_in_fan_out: bool = False
    target_modules: list[str] | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(str(k) for k in data if k not in LORA_KEYS)
            if unknown:
                raise ValueError(f"unknown key {unknown[0]!r}; lora_params keys are {', '.join(LORA_KEYS)}")
        return data

    @field_validator("r")
    @classmethod
    def _positive_rank(cls, r: int) -> int:
        if r <= 0:
            raise ValueError(f"r must be a positive rank, got {r} (Model Zoo's default 0 adapts nothing)")
        return r

    @field_validator("target_modules")
    @classmethod
    def _known_names(cls, names: list[str] | None) -> list[str] | None:
        if names is None:
            return None
        if not names:
            raise ValueError("target_modules is empty; leave it out to adapt every decoder projection")
        for name in names:
            if name in TIED_NAMES:
                raise ValueError(f"target module {name!r}: LoRA on the token embedding / LM head is not supported "
                                 "(they are one tied matrix in the released layout, so a merged model could not hold "
                                 f"the update); adaptable are the decoder projections {', '.join(ADAPTABLE)}")
            if name not in VALID_NAMES:
                raise ValueError(f"unknown target module {name!r}; valid names: {', '.join(sorted(VALID_NAMES))}")
        return names


def as_group_list(value: Any) -> Any:
    """``lora_params`` as Model Zoo accepts it, one mapping or a list of them → a list."""
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list) and not value:
        raise ValueError("lora_params is an empty list; give one mapping or a list of mappings")
    return value


def check_groups(groups: list[LoraGroup] | None) -> list[LoraGroup] | None:
    """Settings one peft adapter can hold: one dropout for all groups (ranks and alphas may differ)."""
    if groups and len({g.dropout for g in groups}) > 1:
        raise ValueError("lora_params: all entries must have the same dropout (peft's adapter format has one "
                         f"lora_dropout), got {[g.dropout for g in groups]}")
    return groups


# ---- the module tree -------------------------------------------------------------------------------


def module_names(model, path: str) -> set[str]:
    """The names module ``path`` of ``model`` answers to: attribute names on its path, the class names
    (btlm's and Model Zoo's) of it and its ancestors, and Model Zoo's attention-projection names."""
    names: set[str] = set()
    module, parts = model, path.split(".")
    for depth in range(len(parts) + 1):
        cls = type(module).__name__
        names.update((cls, *MODEL_ZOO_CLASSES.get(cls, ())))
        if depth < len(parts):
            module = getattr(module, parts[depth]) if not parts[depth].isdigit() else module[int(parts[depth])]
    names.update(p for p in parts if not p.isdigit())
    leaf, parent = parts[-1], parts[-2] if len(parts) > 1 else ""
    if parent == "attn":
        names.update(n for n, b in MODEL_ZOO_ATTENTION.items() if b == leaf)
    return names


def decoder_projections(model) -> list[str]:
    """Names of the adaptable projections (``transformer.h.<i>.attn.c_attn`` ...), in module order."""
    return [name for name, _ in model.named_modules()
            if name.startswith("transformer.h.") and name.rsplit(".", 1)[-1] in ADAPTABLE]


def selects(targets: list[str] | None, names: set[str]) -> bool:
    """Whether ``target_modules`` select a module answering to ``names``: every scope name applies and, when
    projection names are given, one of them does."""
    if targets is None:
        return True
    projections = PROJECTION_NAMES.intersection(targets)
    return set(targets) - projections <= names and (not projections or bool(projections & names))


def assign_groups(model, groups: list[LoraGroup]) -> dict[str, LoraGroup]:
    """Each adapted projection's group: the first whose ``target_modules`` select it (Model Zoo's order rule).

    A group that adapts nothing (its names select nothing, or only what earlier groups took) is an error.
    """
    chosen: dict[str, LoraGroup] = {}
    counts = [0] * len(groups)
    shadowed = 0  # projections that a later entry selects too
    for path in decoder_projections(model):
        names = module_names(model, path)
        matching = [i for i, group in enumerate(groups) if selects(group.target_modules, names)]
        if matching:
            chosen[path] = groups[matching[0]]
            counts[matching[0]] += 1
            shadowed += len(matching) > 1
    for i, n in enumerate(counts):
        if not n:
            where = f"lora_params[{i}]" if len(groups) > 1 else "lora_params"
            raise BTLMError(f"{where}: target_modules {groups[i].target_modules} select no decoder projection"
                            + (" not already taken by an earlier entry" if i else "")
                            + " (all names must apply to a module, except that projection names are alternatives)")
    if shadowed:
        logger.info("lora_params: %d projection(s) selected by more than one entry take the first one's settings "
                    "(Model Zoo's order rule)", shadowed)
    if any(set(g.target_modules or ()) & FUSED_QKV for g in groups):
        logger.info("lora_params: q, k and v are one fused c_attn projection in btlm; its adapter adapts all three")
    return chosen


# ---- peft ------------------------------------------------------------------------------------------


def require_peft():
    """The ``peft`` module, or one clear error saying how to install it."""
    try:
        import peft
    except ImportError:
        raise BTLMError("model.lora_params needs the peft package: pip install 'btlm[finetune]'") from None
    return peft


def peft_config(model, groups: list[LoraGroup]):
    """The ``peft.LoraConfig`` of ``groups`` on ``model``: the adapted projections by full name, the first
    group's rank and alpha as defaults and the others' in ``rank_pattern`` / ``alpha_pattern``."""
    peft = require_peft()
    chosen = assign_groups(model, groups)
    first = groups[0]
    rank = {re.escape(p): g.r for p, g in chosen.items() if g.r != first.r}
    alpha = {re.escape(p): g.alpha for p, g in chosen.items() if g.alpha != first.alpha}
    return peft.LoraConfig(r=first.r, lora_alpha=first.alpha, lora_dropout=first.dropout, target_modules=list(chosen),
                           rank_pattern=rank, alpha_pattern=alpha, fan_in_fan_out=True, bias="none",
                           task_type="CAUSAL_LM")


def apply_lora(model, groups: list[LoraGroup]):
    """Inject the adapters into ``model`` (in place) and freeze everything else; returns ``model``."""
    peft = require_peft()
    config = peft_config(model, groups)
    n_modules = len(config.target_modules)  # peft may shorten the list to name suffixes when injecting
    peft.inject_adapter_in_model(config, model)
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter_key(name))
    n_adapter = sum(p.numel() for n, p in model.named_parameters() if is_adapter_key(n))
    n_all = sum(p.numel() for p in model.parameters())
    logger.info("LoRA: %d projections adapted (r=%s), %d trainable parameters of %d (%.3f%%)",
                n_modules, "/".join(str(r) for r in sorted({g.r for g in groups})), n_adapter,
                n_all, 100 * n_adapter / max(n_all, 1))
    return model


def is_adapter_key(key: str) -> bool:
    """Whether a parameter / state-dict name is a LoRA adapter's (peft's ``lora_A`` / ``lora_B``)."""
    return ".lora_A." in key or ".lora_B." in key


def base_key(key: str) -> str | None:
    """The plain-layout name of a LoRA model's state key (``...c_attn.base_layer.weight`` →
    ``...c_attn.weight``), None for an adapter's."""
    return None if is_adapter_key(key) else key.replace(".base_layer.", ".")


def base_state_to_lora(model, state: dict) -> dict:
    """A state dict in the plain layout (``...c_attn.weight``) renamed for ``model``'s adapted projections
    (``...c_attn.base_layer.weight``); the adapters are absent from it."""
    wrapped = {name for name, m in model.named_modules() if hasattr(m, "base_layer")}
    out = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        out[f"{module}.base_layer.{leaf}" if module in wrapped else key] = value
    return out
