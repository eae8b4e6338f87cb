"""Optimizer, parameter groups and learning-rate scheduler with Model Zoo (cstorch) semantics.

* Parameter groups: no weight decay for biases and normalisation layers; learning-rate
  multipliers from ``optimizer.adjust_learning_rate`` — ``decoder_kernel`` scales every weight matrix
  inside the decoder blocks (muP: ``lr x mup_width_scale``), ``embedding`` the token embedding (tied to
  the output layer) — or from the muP base sizes of the Model Zoo 2.3+ spelling, which give three
  decoder groups (attention, FFN input, FFN output; ``config.lr_multipliers``). When the three
  multipliers are equal they form the one ``decoder_kernel`` group of the older spelling, so both
  spellings of the same muP config give the same groups. The frozen ALiBi slopes are never optimised.
  LoRA adapters (``model.lora_params``; the base weights are then frozen) form a ``lora`` group at lr×1
  with weight decay: they are no width-scaled hidden matrices, and Model Zoo's muP groups skip them too.
* :class:`AdamW` follows cstorch / HF-AdamW: eps is added to ``sqrt(v)`` *before* the bias correction,
  ``correct_bias`` can switch the correction off, and the decay is decoupled and scaled by the group lr.
* Optimizer state never depends on when checkpoints are written: :func:`init_optimizer_state`
  creates the empty state a first update would create, *without* running an update. (PyTorch's
  ``get_optimizer_state_dict`` otherwise initialises empty state with a zero-gradient ``step()``,
  which advances AdamW's bias-correction products and Adam's ``step`` by one update.)
* :class:`ScheduledLR` sets ``lr = schedule(t) x group["adjust_learning_rate"]``; ``t`` is 0 at the
  first optimizer update, so the BTLM warm-up's first update uses lr 0.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from btlm.model import mup_optimizer_groups

from .config import DECODER_LR_GROUPS, ModelConfig, OptimizerConfig, lr_multipliers

_POWERS = ("beta1_power", "beta2_power")


def build_param_groups(model: nn.Module, cfg: OptimizerConfig, model_cfg: ModelConfig | None = None) -> list[dict]:
    """Optimizer param groups: ``{name, params, weight_decay, adjust_learning_rate}``; empty ones dropped.

    Which parameter goes in which group is the model's muP rule (``btlm.model.mup_optimizer_groups``,
    also behind ``get_mup_param_groups``): the three decoder weight-matrix groups, ``embedding`` (token
    and position embeddings, an untied LM head), ``no_decay`` (biases and norm layers), ``lora`` (LoRA
    adapters); ALiBi slopes and
    frozen parameters are left out, tied parameters appear once. ``model_cfg`` supplies the muP base sizes
    of the 2.3+ spelling (without it only ``adjust_learning_rate`` counts). The decoder groups are merged
    into ``decoder_kernel`` when their multipliers are equal (always so in the 2.0-2.2 spelling).
    """
    mults = lr_multipliers(model_cfg, cfg)
    merged = len({mults[k] for k in DECODER_LR_GROUPS}) == 1
    decoder = {"decoder_kernel": mults["decoder_attention"]} if merged else {k: mults[k] for k in DECODER_LR_GROUPS}
    groups = {name: {"weight_decay": cfg.weight_decay, "adjust_learning_rate": m} for name, m in decoder.items()}
    groups["embedding"] = {"weight_decay": cfg.weight_decay, "adjust_learning_rate": mults["embedding"]}
    groups["no_decay"] = {"weight_decay": 0.0, "adjust_learning_rate": 1.0}
    groups["lora"] = {"weight_decay": cfg.weight_decay, "adjust_learning_rate": 1.0}
    members: dict[str, list] = {k: [] for k in groups}
    for group, param in mup_optimizer_groups(model).values():
        members["decoder_kernel" if merged and group in DECODER_LR_GROUPS else group].append(param)
    return [{"name": k, "params": members[k], **groups[k]} for k in groups if members[k]]


class AdamW(torch.optim.Optimizer):
    """AdamW as in cstorch / HF.

    ``u = m / (sqrt(v) + eps)``; with ``correct_bias`` ``u *= sqrt(1 - b2^t) / (1 - b1^t)``;
    ``p -= lr * (u + weight_decay * p)``. State: ``exp_avg``, ``exp_avg_sq``, ``beta1_power``,
    ``beta2_power`` (the running products, as in the Model Zoo checkpoints).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True):
        if lr < 0 or eps <= 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid AdamW hyper-parameters lr={lr} betas={betas} eps={eps} wd={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      correct_bias=correct_bias))

    def _init_param_state(self, p: torch.Tensor) -> None:
        state = self.state[p]
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        # Host float64 scalars: the bias correction is computed in double precision on the CPU
        # (no device sync per parameter), whatever the parameters' dtype and device.
        state["beta1_power"] = torch.tensor(1.0, dtype=torch.float64)
        state["beta2_power"] = torch.tensor(1.0, dtype=torch.float64)

    @torch.no_grad()
    def init_state(self) -> None:
        """Create the state of every parameter that has none, exactly as a first update would."""
        for group in self.param_groups:
            for p in group["params"]:
                if not self.state[p]:
                    self._init_param_state(p)

    def load_state_dict(self, state_dict: dict) -> None:
        """``Optimizer.load_state_dict``, but the beta powers stay CPU float64.

        The base class casts every floating-point state tensor to its parameter's dtype and device,
        which would round the running products to float32: a resumed run would then apply a
        slightly different bias correction than an uninterrupted one.
        """
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        powers = {pid: {k: torch.as_tensor(st[k]).detach().to("cpu", torch.float64).clone()
                        for k in _POWERS if k in st}
                  for pid, st in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            if powers.get(pid):
                self.state[p].update(powers[pid])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    self._init_param_state(p)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(p.grad, 1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                step_size = lr
                if group["correct_bias"]:
                    state["beta1_power"] *= beta1
                    state["beta2_power"] *= beta2
                    b1p, b2p = state["beta1_power"].item(), state["beta2_power"].item()
                    step_size = lr * math.sqrt(1 - b2p) / (1 - b1p)
                if wd:
                    p.mul_(1 - lr * wd)  # decay of the pre-update weights, scaled by the group lr
                p.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-step_size)
        return loss


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, model_cfg: ModelConfig | None = None
                    ) -> torch.optim.Optimizer:
    """The optimizer named by ``optimizer_type`` over :func:`build_param_groups`."""
    groups = build_param_groups(model, cfg, model_cfg)
    kind = cfg.optimizer_type.lower()
    if kind == "adamw":
        return AdamW(groups, lr=0.0, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                     correct_bias=cfg.correct_bias)
    if kind == "adam":  # L2-coupled decay, as torch.optim.Adam
        return torch.optim.Adam(groups, lr=0.0, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=0.0, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


@torch.no_grad()
def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter the state a first update would create, without updating anything.

    Called before the optimizer's state is saved or loaded through
    ``torch.distributed.checkpoint.state_dict``, whose own initialisation of empty state runs one
    ``step()`` with zero gradients and lr 0: that is one Adam step (``step`` count / beta powers
    advanced, and with coupled weight decay ``exp_avg`` filled with ``wd·p``), so a run that saves a
    checkpoint before its first update would train differently from one that does not.
    Supports :class:`AdamW` (ours), ``torch.optim.Adam`` / ``AdamW`` and ``torch.optim.SGD``.
    """
    if isinstance(optimizer, AdamW):
        optimizer.init_state()
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if state:
                continue
            if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
                on_device = group.get("capturable") or group.get("fused")
                dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32  # torch's own
                state["step"] = torch.zeros((), dtype=dtype, device=p.device if on_device else "cpu")
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group.get("amsgrad"):
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif isinstance(optimizer, torch.optim.SGD):
                if group["momentum"] and group.get("dampening", 0) == 0:
                    # buf = momentum·0 + grad equals the first step's buf = grad exactly
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                elif group["momentum"]:
                    raise ValueError("init_optimizer_state: SGD with dampening has no update-free initial state")
            else:
                raise TypeError(f"init_optimizer_state: no update-free initial state for {type(optimizer).__name__}")


class ScheduledLR(torch.optim.lr_scheduler.LRScheduler):
    """``group lr = schedule(last_epoch) x group["adjust_learning_rate"]`` (cstorch ``ScalePerParamLR``).

    Its state is only the step count, so checkpoints hold no pickled Python objects; the schedule
    itself always comes from the params YAML (which is how the 8k stage continues the 2k schedule).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule, last_epoch: int = -1):
        self.schedule = schedule
        for group in optimizer.param_groups:
            group.setdefault("adjust_learning_rate", 1.0)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        base = self.schedule(max(self.last_epoch, 0))
        return [base * g["adjust_learning_rate"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch, "_step_count": self._step_count}

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_epoch = int(state_dict["last_epoch"])
        self._step_count = int(state_dict.get("_step_count", self.last_epoch + 1))
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]
