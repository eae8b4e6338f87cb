"""BTLM model classes, registered with the ``transformers`` Auto classes (no ``trust_remote_code``)."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .model import (
    PRESETS,
    AlibiPositionEmbeddingLayer,
    BTLMAttention,
    BTLMBlock,
    BTLMConfig,
    BTLMLMHeadModel,
    BTLMMLP,
    BTLMModel,
    BTLMPreTrainedModel,
    alibi_bias,
    alibi_divisor,
    alibi_slopes,
    check_token_ids,
    config_from_preset,
    mup_init_std,
    mup_named_parameters,
    mup_optimizer_groups,
    mup_param_kind,
    validate_alibi_scaling,
)


def register_auto_classes() -> None:
    """Register ``model_type="btlm"`` with AutoConfig / AutoModel / AutoModelForCausalLM (idempotent).

    With this, ``AutoModelForCausalLM.from_pretrained(dir)`` loads a directory holding the released
    ``config.json`` (its ``auto_map`` included) without ``trust_remote_code``.
    """
    try:
        AutoConfig.register("btlm", BTLMConfig)
    except ValueError:  # already registered (e.g. the module was reloaded)
        pass
    for auto_cls, model_cls in ((AutoModel, BTLMModel), (AutoModelForCausalLM, BTLMLMHeadModel)):
        try:
            auto_cls.register(BTLMConfig, model_cls, exist_ok=True)
        except TypeError:  # older signature without exist_ok
            auto_cls.register(BTLMConfig, model_cls)


register_auto_classes()

__all__ = [
    "PRESETS",
    "AlibiPositionEmbeddingLayer",
    "BTLMAttention",
    "BTLMBlock",
    "BTLMConfig",
    "BTLMLMHeadModel",
    "BTLMMLP",
    "BTLMModel",
    "BTLMPreTrainedModel",
    "alibi_bias",
    "alibi_divisor",
    "alibi_slopes",
    "check_token_ids",
    "config_from_preset",
    "register_auto_classes",
    "validate_alibi_scaling",
]
