"""Position-interpolation fine-tuning configs: they validate, map to the model card's fixed-factor ALiBi
scaling with ``n_positions`` raised, and keep the architecture of the model they continue from (so
``--load_checkpoint_states model`` loads its weights strictly)."""

from __future__ import annotations

import pytest
import torch

from btlm.train.config import load_params
from btlm.train.convert import hf_config_to_params
from btlm.train.zoo_model import btlm_config_from_params

from .conftest import CONFIGS

# (PI config, the config of the model it continues, fine-tuning length, base training length)
PI_CONFIGS = [
    ("params_btlm_2p7b_32k_pi.yaml", "params_btlm_2p7b_8k.yaml", 32768, 8192),
    ("params_btlm_tiny_pi_finetune.yaml", "params_btlm_tiny_cpu.yaml", 512, 128),
]


def _config(name: str):
    params, _ = load_params(CONFIGS / name)
    return params, btlm_config_from_params(params.model, params.optimizer)


@pytest.mark.parametrize("name,base,length,trained", PI_CONFIGS)
def test_pi_config_maps_to_fixed_alibi_scaling(name, base, length, trained):
    params, config = _config(name)
    assert config.n_positions == length
    # the model card's recipe: factor = fine-tuning length / training length, a float (an int is invalid)
    assert config.alibi_scaling == {"type": "linear", "factor": 4.0}
    assert isinstance(config.alibi_scaling["factor"], float)
    assert config.alibi_scaling["factor"] == length / trained
    assert params.model.loss_weight == 1 / length  # 1/max_sequence_length, as in the released stages
    # the exported HF config.json carries the factor back (btlm convert to-hf / from-hf round trip)
    assert hf_config_to_params(config)["model"]["pos_scaling_factor"] == 4.0


@pytest.mark.parametrize("name,base,length,trained", PI_CONFIGS)
def test_pi_config_keeps_the_base_architecture(name, base, length, trained):
    _, pi = _config(name)
    _, ref = _config(base)
    keep = ("vocab_size", "n_embd", "n_layer", "n_head", "n_inner", "activation_function", "mup_width_scale",
            "mup_embeddings_scale", "mup_output_alpha", "mup_scale_qk_dot_by_d", "scale_attn_weights",
            "position_embedding_type", "layer_norm_epsilon")
    assert {k: getattr(pi, k) for k in keep} == {k: getattr(ref, k) for k in keep}
    assert ref.n_positions == trained and ref.alibi_scaling is None

    from btlm.model import BTLMLMHeadModel

    with torch.device("meta"):  # shapes only: the 3B model is never materialised
        shapes = [{k: tuple(v.shape) for k, v in BTLMLMHeadModel(c).state_dict().items()} for c in (pi, ref)]
    assert shapes[0] == shapes[1]


@pytest.mark.parametrize("name", [n for n, *_ in PI_CONFIGS])
def test_pi_schedule_is_short_and_small(name):
    params, raw = load_params(CONFIGS / name)
    base = {"params_btlm_2p7b_32k_pi.yaml": "params_btlm_2p7b_8k.yaml",
            "params_btlm_tiny_pi_finetune.yaml": "params_btlm_tiny_cpu.yaml"}[name]
    base_params, _ = load_params(CONFIGS / base)
    lr, base_lr = params.optimizer.schedule(), base_params.optimizer.schedule()
    steps = params.runconfig.max_steps
    assert lr(0) == 0.0  # warm-up from 0: fresh optimizer state after --load_checkpoint_states model
    peak = max(lr(s) for s in range(steps))
    base_peak = max(base_lr(s) for s in range(0, base_params.runconfig.max_steps, 7))  # a lower bound
    assert 0 < peak <= base_peak / 2  # adapt the trained weights, do not re-train them
    assert lr(steps - 1) <= peak / 5  # decays within the short schedule
    assert steps < base_params.runconfig.max_steps
