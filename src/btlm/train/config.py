"""Pydantic schema of the Cerebras Model Zoo BTLM YAML (Release 2.0.2 – 2.1.1 layout).

The YAML has five sections: ``train_input``, ``eval_input``, ``model``, ``optimizer`` and ``runconfig``.
Every key the Model Zoo uses on CPU/GPU is typed here; invalid values stop the run with
:class:`ConfigError` naming the file, the dotted key and what was expected. Keys that only mean
something on Cerebras hardware are accepted and listed once as ignored (the R2.1 jsonschema rejected
some of them, which broke R2.0.2 configs); keys nobody knows produce a warning, not an error.
"""

from __future__ import annotations

import logging
import math
from bisect import bisect_right
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml

from btlm.data.loader_config import LoaderConfig
from btlm.errors import BTLMError
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    model_validator,
)

from .lora import LoraGroup, as_group_list, check_groups

logger = logging.getLogger("btlm.train")

#: Keys that only configure Cerebras systems (CS-2 clusters); accepted anywhere and ignored.
CEREBRAS_ONLY_KEYS = frozenset(
    {
        "use_cs_grad_accum", "micro_batch_size", "use_appliance_data", "use_worker_cache", "num_csx",
        "num_workers_per_csx", "num_wgt_servers", "num_act_servers", "compile_only", "validate_only",
        "compile_dir", "mount_dirs", "python_paths", "credentials_path", "mgmt_address", "mgmt_namespace",
        "job_labels", "job_time_sec", "wsc_log_level", "autogen_policy", "lazy_initialization", "drop_data",
        "retrace_every_iteration", "precision_opt_level", "alibi_implementation", "attention_kernel",
        "transfer_processes", "disable_version_check", "debug_args_path", "use_cstorch_optimizer_step",
        "skip_train_recv_activations", "enable_act_frequency", "log_initialization", "dump_activations",
        "sync_batchnorm", "variant", "experimental", "log_input_summaries",
    }
)

#: Keys renamed by Model Zoo R2.0; the old spellings are an error there and here.
RENAMED_SCHEDULER_KEYS = {
    "decay_steps": "total_iters", "steps": "total_iters", "learning_rate": "initial_learning_rate",
    "base_lr": "initial_learning_rate", "values": "learning_rates", "boundaries": "milestones",
}
RENAMED_OPTIMIZER_KEYS = {"weight_decay_rate": "weight_decay", "beta1": "betas", "beta2": "betas",
                          "eps1": "eps", "eps2": "eps"}


class ConfigError(BTLMError, ValueError):
    """An invalid params YAML: the message names the file, the key and what was expected."""


class _Section(BaseModel):
    """Base of every YAML section: unknown keys are kept (and reported) rather than rejected."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)


# --------------------------------------------------------------------------------------------------
# Learning-rate schedules. Each config object *is* the schedule: ``sched(t)`` is the learning rate
# at scheduler step t (0 at the first optimizer update). Closed forms follow cstorch's schedulers.
# --------------------------------------------------------------------------------------------------


class _Schedule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scheduler: str
    #: Length of this stage inside a sequential list (required for all but the last entry).
    total_iters: PositiveInt | None = None

    @model_validator(mode="before")
    @classmethod
    def _reject_renamed(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for old, new in RENAMED_SCHEDULER_KEYS.items():
                # ``learning_rate`` is a real key of Constant; everything else is a removed name.
                if old in data and old not in cls.model_fields:
                    raise ValueError(f"key {old!r} is no longer supported (Model Zoo R2.0+), use {new!r}")
        return data

    def __call__(self, t: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError


class Constant(_Schedule):
    scheduler: Literal["constant"]
    learning_rate: NonNegativeFloat

    def __call__(self, t: int) -> float:
        return self.learning_rate


class Polynomial(_Schedule):
    scheduler: Literal["polynomial", "linear"]
    initial_learning_rate: NonNegativeFloat
    end_learning_rate: NonNegativeFloat
    total_iters: PositiveInt
    power: PositiveFloat = 1.0
    cycle: bool = False

    def __call__(self, t: int) -> float:
        if self.scheduler == "linear" and self.power != 1.0:
            raise ValueError("Linear is Polynomial with power 1")
        period = self.total_iters
        if self.cycle:  # cstorch: the decay period grows by whole multiples as t passes it
            period *= max(1, math.ceil((t + 1) / self.total_iters))
        elif t >= self.total_iters:
            return self.end_learning_rate
        frac = (1.0 - t / period) ** self.power
        return self.end_learning_rate + (self.initial_learning_rate - self.end_learning_rate) * frac


class Exponential(_Schedule):
    scheduler: Literal["exponential"]
    initial_learning_rate: NonNegativeFloat
    total_iters: PositiveInt
    decay_rate: PositiveFloat
    staircase: bool = False

    def __call__(self, t: int) -> float:
        power = t / self.total_iters
        return self.initial_learning_rate * self.decay_rate ** (math.floor(power) if self.staircase else power)


class InverseExponentialTimeDecay(_Schedule):
    scheduler: Literal["inverseexponentialtimedecay"]
    initial_learning_rate: NonNegativeFloat
    step_exponent: float
    total_iters: PositiveInt
    decay_rate: NonNegativeFloat
    staircase: bool = False

    def __call__(self, t: int) -> float:
        alpha = t**self.step_exponent / self.total_iters
        if self.staircase:
            alpha = math.floor(alpha)
        return self.initial_learning_rate / (1.0 + self.decay_rate * alpha)


class InverseSquareRootDecay(_Schedule):
    scheduler: Literal["inversesquarerootdecay"]
    initial_learning_rate: NonNegativeFloat = 1.0
    scale: PositiveFloat = 1.0
    warmup_steps: PositiveInt = 1

    def __call__(self, t: int) -> float:
        return self.initial_learning_rate * self.scale / math.sqrt(max(t, self.warmup_steps))


class CosineDecay(_Schedule):
    scheduler: Literal["cosinedecay"]
    initial_learning_rate: NonNegativeFloat
    end_learning_rate: NonNegativeFloat
    total_iters: PositiveInt

    def __call__(self, t: int) -> float:
        t = min(t, self.total_iters)  # cstorch clips the step: lr stays at end_learning_rate afterwards
        cos = 0.5 * (1.0 + math.cos(math.pi * t / self.total_iters))
        return self.end_learning_rate + (self.initial_learning_rate - self.end_learning_rate) * cos


class CosineAnnealing(_Schedule):
    scheduler: Literal["cosineannealing"]
    initial_learning_rate: NonNegativeFloat
    T_max: PositiveInt
    eta_min: NonNegativeFloat = 0.0

    def __call__(self, t: int) -> float:
        # PyTorch's closed form (periodic in 2*T_max), which cstorch reproduces.
        return self.eta_min + (self.initial_learning_rate - self.eta_min) * 0.5 * (
            1.0 + math.cos(math.pi * t / self.T_max)
        )


class Step(_Schedule):
    scheduler: Literal["step"]
    initial_learning_rate: NonNegativeFloat
    step_size: PositiveInt
    gamma: PositiveFloat

    def __call__(self, t: int) -> float:
        return self.initial_learning_rate * self.gamma ** (t // self.step_size)


class MultiStep(_Schedule):
    scheduler: Literal["multistep"]
    initial_learning_rate: NonNegativeFloat
    gamma: PositiveFloat
    milestones: list[NonNegativeInt]

    def __call__(self, t: int) -> float:
        return self.initial_learning_rate * self.gamma ** bisect_right(sorted(self.milestones), t)


class PiecewiseConstant(_Schedule):
    scheduler: Literal["piecewiseconstant"]
    learning_rates: list[NonNegativeFloat]
    milestones: list[PositiveInt]

    @model_validator(mode="after")
    def _lengths(self) -> PiecewiseConstant:
        if len(self.learning_rates) != len(self.milestones) + 1:
            raise ValueError("learning_rates must have exactly one more entry than milestones")
        if self.milestones != sorted(self.milestones):
            raise ValueError("milestones must be increasing")
        return self

    def __call__(self, t: int) -> float:
        return self.learning_rates[bisect_right(self.milestones, t)]


SCHEDULES = (Constant, Polynomial, Exponential, InverseExponentialTimeDecay, InverseSquareRootDecay,
             CosineDecay, CosineAnnealing, Step, MultiStep, PiecewiseConstant)
SCHEDULE_NAMES = sorted(n for cls in SCHEDULES for n in cls.model_fields["scheduler"].annotation.__args__)


def _normalise_scheduler(data: Any) -> Any:
    """Scheduler names are case-insensitive class names with an optional ``LR`` suffix."""
    if isinstance(data, dict) and isinstance(data.get("scheduler"), str):
        name = data["scheduler"].lower()
        name = name[:-2] if name.endswith("lr") else name
        if name not in SCHEDULE_NAMES:
            raise ValueError(f"unknown scheduler {data['scheduler']!r}; expected one of {SCHEDULE_NAMES}")
        data = {**data, "scheduler": name}
    return data


ScheduleConfig = Annotated[
    Union[Constant, Polynomial, Exponential, InverseExponentialTimeDecay, InverseSquareRootDecay,  # noqa: UP007
          CosineDecay, CosineAnnealing, Step, MultiStep, PiecewiseConstant],
    Field(discriminator="scheduler"),
    BeforeValidator(_normalise_scheduler),
]


class SequentialSchedule:
    """A list of schedules run one after another (cstorch ``SequentialLR``).

    Milestones are the cumulative ``total_iters`` of all but the last entry; each stage sees its own
    local step count starting at 0, like ``torch.optim.lr_scheduler.SequentialLR``.
    """

    def __init__(self, stages: list[_Schedule]):
        self.stages = stages
        self.milestones = []
        start = 0
        for stage in stages[:-1]:
            start += stage.total_iters
            self.milestones.append(start)

    def __call__(self, t: int) -> float:
        i = bisect_right(self.milestones, t)
        return self.stages[i](t - (self.milestones[i - 1] if i else 0))


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


class InputConfig(LoaderConfig):
    """``train_input`` / ``eval_input``: the loader's keys (:class:`~btlm.data.loader_config.LoaderConfig`), passed
    through whole to ``GptHDF5MapDataProcessor``; unknown keys are kept and reported, as in every section."""

    model_config = _Section.model_config
    data_processor: Literal["GptHDF5MapDataProcessor"] = "GptHDF5MapDataProcessor"

    @model_validator(mode="after")
    def _one_source(self) -> InputConfig:
        if (self.data_dir is None) == (self.mixture is None):
            raise ValueError("exactly one of data_dir or mixture must be given")
        return self


class InitializerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["truncated_normal", "normal", "zeros", "ones", "constant"]
    mean: float = 0.0
    std: PositiveFloat = 1.0
    a: float | None = None
    b: float | None = None
    val: float | None = None

    @model_validator(mode="after")
    def _bounds(self) -> InitializerConfig:
        if self.name == "truncated_normal":
            lo, hi = self.bounds()
            if not lo < hi:
                raise ValueError(f"truncated_normal needs a < b, got a={lo}, b={hi}")
        if self.name == "constant" and self.val is None:
            raise ValueError("constant initializer needs 'val'")
        return self

    def bounds(self) -> tuple[float, float]:
        """Absolute truncation bounds; the Model Zoo default is ±2σ around the mean."""
        lo = self.mean - 2 * self.std if self.a is None else self.a
        hi = self.mean + 2 * self.std if self.b is None else self.b
        return lo, hi


class ModelConfig(_Section):
    """``model``: a GPT-2 style decoder with ALiBi, SwiGLU and muP scalars."""

    hidden_size: PositiveInt
    num_hidden_layers: PositiveInt
    num_heads: PositiveInt
    filter_size: PositiveInt
    vocab_size: PositiveInt = 50257
    max_position_embeddings: PositiveInt
    position_embedding_type: Literal["alibi", "learned"] = "learned"
    use_position_embedding: bool = True  # R2.0.2 spelling; False is rejected below (BTLM always has PE)
    share_embedding_weights: Literal[True] = True  # the released model always ties lm_head to wte
    dropout_rate: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    embedding_dropout_rate: Annotated[float, Field(ge=0.0, lt=1.0)] | None = None
    attention_dropout_rate: Annotated[float, Field(ge=0.0, lt=1.0)] | None = None
    layer_norm_epsilon: PositiveFloat = 1e-5
    norm_type: Literal["layernorm"] = "layernorm"
    attention_type: Literal["scaled_dot_product", "dot_product"] = "scaled_dot_product"
    use_projection_bias_in_attention: Literal[True] = True
    use_ffn_bias_in_attention: Literal[True] = True
    use_ffn_bias: Literal[True] = True
    use_bias_in_output: Literal[False] = False
    nonlinearity: Literal["swiglu", "gelu_new", "gelu", "relu", "silu"] = "gelu_new"
    embedding_initializer: InitializerConfig | None = None
    initializer: InitializerConfig | None = None
    output_layer_initializer: InitializerConfig | None = None
    #: Model Zoo >= 2.3: FFN input / output initializers (default: ``initializer`` / ``output_layer_initializer``).
    ffn_initializer: InitializerConfig | None = None
    ffn_output_layer_initializer: InitializerConfig | None = None
    initializer_range: PositiveFloat = 0.02
    loss_scaling: Literal["batch_size", "num_tokens"] = "num_tokens"
    loss_weight: PositiveFloat = 1.0
    mixed_precision: bool = False
    fp16_type: Literal["bfloat16", "cbfloat16", "float16"] = "bfloat16"
    use_bfloat16: bool | None = None  # R2.0.2 alias of fp16_type: bfloat16
    output_logits_scale: PositiveFloat | None = None
    embeddings_scale: PositiveFloat = 1.0
    scale_qk_dot_by_d: bool = False
    # muP as Model Zoo >= 2.3 spells it: widths of the tuned base model, from which the initializer
    # scaling, the output-logit scale and the learning-rate groups follow (see :meth:`mup_base_form`).
    mup_base_hidden_size: PositiveFloat | None = None
    mup_base_filter_size: PositiveFloat | None = None
    output_logits_alpha: PositiveFloat | None = None
    scale_output_logits_by_d: bool = True
    attention_logits_alpha: PositiveFloat = 1.0
    scale_qk_dot_by_layer_idx: bool = False
    pos_scaling_factor: Annotated[float, Field(ge=1.0)] = 1.0
    attention_softmax_fp32: bool = True
    compute_eval_metrics: bool = True
    #: Model Zoo >= 2.2: LoRA adapters (one mapping or a list); see :mod:`btlm.train.lora`.
    lora_params: Annotated[list[LoraGroup] | None, BeforeValidator(as_group_list), AfterValidator(check_groups)] = None

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.loss_scaling == "num_tokens" and self.loss_weight != 1.0:
            raise ValueError("loss_scaling: num_tokens requires loss_weight: 1.0")
        if not self.use_position_embedding:
            raise ValueError("use_position_embedding: False (no position information) is not supported")
        if self.pos_scaling_factor != 1.0 and self.position_embedding_type != "alibi":
            raise ValueError("pos_scaling_factor only applies to position_embedding_type: alibi")
        if self.mup_base_hidden_size is not None and self.output_logits_scale is not None:
            raise ValueError("give either output_logits_scale (Model Zoo 2.0-2.2 muP) or mup_base_hidden_size "
                             "with output_logits_alpha (2.3+), not both: the logit scale would be ambiguous")
        if self.output_logits_alpha is not None and self.mup_base_hidden_size is None:
            raise ValueError("output_logits_alpha needs mup_base_hidden_size (it is the muP output multiplier)")
        if self.attention_logits_alpha != 1.0:
            raise ValueError("attention_logits_alpha other than 1.0 is not supported: the released BTLM layout "
                             "has no attention-logit multiplier, so such a model could not be exported")
        return self

    @property
    def hidden_width_mult(self) -> float:
        """``hidden_size / mup_base_hidden_size`` (1.0 without muP base sizes)."""
        return self.hidden_size / self.mup_base_hidden_size if self.mup_base_hidden_size else 1.0

    @property
    def filter_width_mult(self) -> float:
        """``filter_size / mup_base_filter_size`` (1.0 without it)."""
        return self.filter_size / self.mup_base_filter_size if self.mup_base_filter_size else 1.0

    def logits_scale(self) -> float | None:
        """The factor applied to the LM-head output, or None for none.

        2.0-2.2 spelling: ``output_logits_scale`` as given. 2.3+ spelling (Model Zoo's GPT-2 model):
        ``output_logits_alpha / m`` with ``m = hidden_size / mup_base_hidden_size``, or ``/ √m`` when
        ``scale_output_logits_by_d`` is False; alpha defaults to 1.0.
        """
        if self.mup_base_hidden_size is None:
            return self.output_logits_scale
        alpha = self.output_logits_alpha or 1.0
        m = self.hidden_width_mult
        return alpha / m if self.scale_output_logits_by_d else alpha / m**0.5

    @property
    def half_dtype(self) -> str:
        """The autocast dtype: cbfloat16 is a Cerebras format and maps to bfloat16."""
        if self.use_bfloat16:
            return "bfloat16"
        return "bfloat16" if self.fp16_type == "cbfloat16" else self.fp16_type


class OptimizerConfig(_Section):
    """``optimizer``: AdamW with muP learning-rate groups and a (sequential) LR schedule."""

    optimizer_type: str = "AdamW"
    learning_rate: NonNegativeFloat | ScheduleConfig | list[ScheduleConfig]
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    eps: PositiveFloat = 1e-6
    weight_decay: NonNegativeFloat = 0.0
    correct_bias: bool = True
    momentum: NonNegativeFloat = 0.0
    max_gradient_norm: PositiveFloat | None = None
    max_gradient_value: PositiveFloat | None = None
    loss_scaling_factor: PositiveFloat | Literal["dynamic"] | None = 1.0
    initial_loss_scale: PositiveFloat | None = None
    steps_per_increase: PositiveInt = 2000
    min_loss_scale: PositiveFloat | None = None
    max_loss_scale: PositiveFloat | None = None
    adjust_learning_rate: dict[Literal["decoder_kernel", "embedding"], PositiveFloat] | None = None
    log_summaries: bool = False
    grad_accum_steps: PositiveInt = 1

    @model_validator(mode="before")
    @classmethod
    def _reject_renamed(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for old, new in RENAMED_OPTIMIZER_KEYS.items():
                if old in data:
                    raise ValueError(f"key {old!r} is no longer supported (Model Zoo R2.0+), use {new!r}")
        return data

    @model_validator(mode="after")
    def _consistent(self) -> OptimizerConfig:
        if self.optimizer_type.lower() not in ("adamw", "adam", "sgd"):
            raise ValueError(f"optimizer_type {self.optimizer_type!r} is not supported; use AdamW, Adam or SGD")
        if self.max_gradient_norm is not None and self.max_gradient_value is not None:
            raise ValueError("max_gradient_norm and max_gradient_value are mutually exclusive")
        if isinstance(self.learning_rate, list):
            if not self.learning_rate:
                raise ValueError("learning_rate list is empty")
            for i, stage in enumerate(self.learning_rate[:-1]):
                if stage.total_iters is None:
                    raise ValueError(f"learning_rate[{i}] needs total_iters (it is followed by another stage)")
        return self

    def schedule(self):
        """The learning rate as a function of the scheduler step (0 = first optimizer update)."""
        lr = self.learning_rate
        if isinstance(lr, (int, float)):
            return Constant(scheduler="constant", learning_rate=lr)
        return SequentialSchedule(lr) if isinstance(lr, list) else lr


class RunConfig(_Section):
    """``runconfig`` plus the CLI flags merged into it (a flag that is given overrides the YAML key)."""

    mode: Literal["train", "eval", "eval_all", "train_and_eval"] | None = None
    target_device: Literal["CPU", "GPU"] | None = None
    model_dir: str | None = None
    max_steps: PositiveInt | None = None
    num_steps: PositiveInt | None = None
    num_epochs: PositiveInt | None = None
    steps_per_epoch: PositiveInt | None = None
    eval_steps: PositiveInt | None = None
    eval_frequency: PositiveInt | None = None
    checkpoint_steps: NonNegativeInt | None = None
    max_checkpoints: PositiveInt | None = None
    save_initial_checkpoint: bool = False
    autoload_last_checkpoint: bool = True
    checkpoint_path: str | None = None
    load_checkpoint_states: str | None = None
    disable_strict_checkpoint_loading: bool | None = None
    log_steps: PositiveInt = 1
    logging: str | int | None = None
    seed: int | None = None
    check_loss_values: bool = True
    enable_distributed: bool = False
    dist_backend: Literal["nccl", "gloo", "mpi"] | None = None
    init_method: str = "env://"
    dist_addr: str | None = None
    main_process_id: NonNegativeInt = 0
    summary_dir: str | None = None
    # --- btlm extensions (not in the Model Zoo schema) -----------------------------------------
    #: Data-parallel engine when distributed: DDP (replicated) or FSDP2 (``fully_shard``).
    distributed_strategy: Literal["ddp", "fsdp"] = "ddp"
    #: How long a collective may wait (minutes), e.g. ranks at a barrier while rank 0 writes a checkpoint.
    dist_timeout_minutes: PositiveFloat = 60.0
    #: Recompute each block's activations in backward (saves memory for long sequences).
    activation_checkpointing: bool = False
    #: Wrap the model in ``torch.compile`` (worth it on GPU; 0.96–1.03x on the 2-core CPU).
    compile: bool = False
    #: Peak FLOP/s for the MFU figure; default: measured fp32 matmul on CPU, bf16 dense peak on GPU.
    peak_flops: PositiveFloat | None = None
    #: Attention implementation of the model ("sdpa" is memory-bounded, "eager" the reference).
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    #: Load ``checkpoint_<step>.dcp`` directories (FSDP2), whose ``.metadata`` is a pickle: set only by
    #: ``--allow_unpickle``; without it no automatic path (auto-resume, eval) unpickles anything.
    allow_unpickle: bool = False


#: The learning-rate groups of muP training (Model Zoo >= 2.3 ``lr_adjustment_groups`` of the GPT-2
#: model): attention q/k/v and output projections, FFN input projection(s), FFN output projection.
DECODER_LR_GROUPS = ("decoder_attention", "decoder_input_ffn", "decoder_output_ffn")


def lr_multipliers(model: ModelConfig | None, optimizer: OptimizerConfig) -> dict[str, float]:
    """Learning-rate multiplier of each group: the three decoder groups and ``embedding``.

    * 2.0-2.2 spelling: every decoder weight matrix gets ``adjust_learning_rate.decoder_kernel``.
    * 2.3+ spelling (``mup_base_hidden_size`` / ``mup_base_filter_size``): attention and FFN input get
      ``1 / (hidden_size / mup_base_hidden_size)``, the FFN output ``1 / (filter_size /
      mup_base_filter_size)`` (Model Zoo computes them as these reciprocals; we do too, bit for bit).
      An ``adjust_learning_rate.decoder_kernel`` given as well must agree with all three.
    * ``embedding``: ``adjust_learning_rate.embedding`` (1.0 if absent) in both spellings.
    """
    adjust = optimizer.adjust_learning_rate or {}
    kernel = adjust.get("decoder_kernel")
    mults = dict.fromkeys(DECODER_LR_GROUPS, 1.0 if kernel is None else kernel)
    if model is not None and model.mup_base_hidden_size:
        mults["decoder_attention"] = mults["decoder_input_ffn"] = 1 / model.hidden_width_mult
    if model is not None and model.mup_base_filter_size:
        mults["decoder_output_ffn"] = 1 / model.filter_width_mult
    if kernel is not None and model is not None and (model.mup_base_hidden_size or model.mup_base_filter_size):
        for name, value in mults.items():
            if not math.isclose(value, kernel, rel_tol=1e-9):
                raise ValueError(f"optimizer.adjust_learning_rate.decoder_kernel {kernel} disagrees with the muP "
                                 f"base sizes, which give {name} x{value}; drop decoder_kernel or fix the sizes")
    mults["embedding"] = adjust.get("embedding", 1.0)
    return mults


class Params(_Section):
    """The whole params YAML."""

    train_input: InputConfig | None = None
    eval_input: InputConfig | None = None
    model: ModelConfig
    optimizer: OptimizerConfig | None = None
    runconfig: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _mup_consistent(self) -> Params:
        if self.optimizer is not None:
            lr_multipliers(self.model, self.optimizer)  # raises when the two muP spellings disagree
        return self


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


_TYPE_MISMATCH = {"float_type", "float_parsing", "list_type", "model_type", "dict_type", "model_attributes_type"}


def _format_error(source: str, err: ValidationError) -> str:
    """One readable message: ``file: key.path: what was expected (got value)`` per problem.

    pydantic reports every member of a union (number | schedule | list of schedules); the
    "wrong type" complaints of the members that clearly did not apply are dropped when a more specific
    error exists for the same key.
    """

    def key(e) -> str:  # union-member tags look like "constrained-float" or "list[...]"
        return ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and ("[" in p or "-" in p
                                                                                  or p in SCHEDULE_NAMES)))

    errors = err.errors()
    specific = [key(e) for e in errors if e["type"] not in _TYPE_MISMATCH]
    lines = []
    for e in errors:
        k = key(e)
        if e["type"] in _TYPE_MISMATCH and any(s == k or s.startswith(k + ".") for s in specific):
            continue
        value = e.get("input")
        shown = f" (got {value!r})" if not isinstance(value, (dict, list)) and value is not None else ""
        lines.append(f"  {k or '<top>'}: {e['msg']}{shown}")
    return f"{source}: invalid params\n" + "\n".join(list(dict.fromkeys(lines))[:8])


def report_extra_keys(params: Params, log: logging.Logger = logger) -> tuple[list[str], list[str]]:
    """Log (once) the Cerebras-only keys that are ignored and warn about unknown keys.

    Returns ``(ignored, unknown)`` as dotted key paths.
    """
    ignored, unknown = [], []
    sections = {"": params, **{n: getattr(params, n) for n in Params.model_fields if getattr(params, n) is not None}}
    for name, section in sections.items():
        for key in (section.model_extra or {}):
            dotted = f"{name}.{key}" if name else key
            (ignored if key in CEREBRAS_ONLY_KEYS else unknown).append(dotted)
    if ignored:
        log.info("Ignoring Cerebras-hardware-only keys: %s", ", ".join(ignored))
    for key in unknown:
        log.warning("Unknown params key %r is ignored (check its spelling)", key)
    return ignored, unknown


#: ``trainer.init.precision`` keys → (section, key) of the 2.0-2.1 layout.
_PRECISION_KEYS = {
    "enabled": ("model", "mixed_precision"), "fp16_type": ("model", "fp16_type"),
    "precision_opt_level": ("runconfig", "precision_opt_level"),
    "loss_scaling_factor": ("optimizer", "loss_scaling_factor"),
    "initial_loss_scale": ("optimizer", "initial_loss_scale"),
    "steps_per_increase": ("optimizer", "steps_per_increase"), "min_loss_scale": ("optimizer", "min_loss_scale"),
    "max_loss_scale": ("optimizer", "max_loss_scale"), "max_gradient_norm": ("optimizer", "max_gradient_norm"),
    "max_gradient_value": ("optimizer", "max_gradient_value"), "log_loss_scale": None,
}
_LOOP_KEYS = {"max_steps": "max_steps", "num_steps": "num_steps", "eval_frequency": "eval_frequency",
              "eval_steps": "eval_steps"}
_CHECKPOINT_KEYS = {"steps": "checkpoint_steps", "save_initial_checkpoint": "save_initial_checkpoint",
                    "disable_strict_checkpoint_loading": "disable_strict_checkpoint_loading",
                    "autoload_last_checkpoint": "autoload_last_checkpoint", "checkpoint_path": "checkpoint_path"}
#: Callbacks that only tune Cerebras systems or duplicate what btlm logs anyway (grad/param norms).
_IGNORED_CALLBACKS = {"ScopedTrainFlags", "ScopedValidateFlags", "ComputeNorm", "GlobalFlags", "DebugArgsPath",
                      "LogOptimizerParamGroup", "CheckLoss", "RateProfiler", "DurationProfiler", "FlopUtilization"}
_MODEL_NAMES = {"btlm", "gpt2"}


def _one_entry(value: Any, where: str) -> tuple[str, dict]:
    """``{Name: {kwargs}}`` → (Name, kwargs), the 2.x spelling of a class and its arguments."""
    if not (isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())) or {}, dict)):
        raise ValueError(f"{where}: expected one {{ClassName: {{arguments}}}} entry, got {value!r}")
    name, kwargs = next(iter(value.items()))
    return name, dict(kwargs or {})


def _schedule_from_trainer(value: Any, where: str) -> Any:
    name, kwargs = _one_entry(value, where)
    if name == "SequentialLR":
        stages = kwargs.pop("schedulers", None)
        if kwargs or not isinstance(stages, list) or not stages:
            raise ValueError(f"{where}.SequentialLR: expected only a non-empty 'schedulers' list")
        return [_schedule_from_trainer(s, f"{where}.SequentialLR.schedulers[{i}]") for i, s in enumerate(stages)]
    return {"scheduler": name, **kwargs}


def trainer_to_params(raw: dict, log: logging.Logger = logger) -> dict:
    """A Model Zoo 2.x ``trainer:`` YAML (BTLM / GPT-2 model) → the 2.0-2.1 sections btlm validates.

    ``init.model`` → ``model`` (``name`` must be btlm or gpt2); ``init.optimizer: {AdamW: {…}}`` →
    ``optimizer`` with ``optimizer_type``; ``init.schedulers: [SequentialLR: {schedulers: [LinearLR…]}]``
    → ``optimizer.learning_rate`` (a list of stages); ``init.precision`` → ``model.mixed_precision`` /
    ``fp16_type`` and the optimizer's loss-scaling / clipping keys; ``init.loop`` and ``init.checkpoint``
    → ``runconfig`` (``steps`` → ``checkpoint_steps``); the ``Lora`` callback's ``lora_params`` →
    ``model.lora_params``; ``init.seed`` and ``init.logging.log_steps`` →
    ``runconfig``; ``fit.train_dataloader`` / ``fit.val_dataloader`` (else ``validate.val_dataloader``)
    → ``train_input`` / ``eval_input``. ``init.backend`` and the Cerebras-only callbacks are ignored
    (one log line); any other key raises ``ValueError`` naming it.
    """
    trainer = raw.get("trainer")
    extra = sorted(set(raw) - {"trainer"})
    if extra:
        raise ValueError(f"{extra[0]}: a trainer: YAML has only the top-level key 'trainer'")
    if isinstance(trainer, list):
        if len(trainer) != 1:
            raise ValueError("trainer: a list of several trainers (multi-phase runs) is not supported")
        trainer = trainer[0].get("trainer") if isinstance(trainer[0], dict) else None
    if not isinstance(trainer, dict):
        raise ValueError("trainer: expected a mapping with init / fit / validate sections")
    out: dict[str, Any] = {"runconfig": {}}
    ignored: list[str] = []
    for key in set(trainer) - {"init", "fit", "validate", "validate_all"}:
        raise ValueError(f"trainer.{key}: not a known trainer section (expected init, fit, validate, validate_all)")
    init = dict(trainer.get("init") or {})
    model = dict(init.pop("model", None) or {})
    name = model.pop("name", "gpt2")
    if str(name).lower() not in _MODEL_NAMES:
        raise ValueError(f"trainer.init.model.name: {name!r} is not supported "
                         f"(btlm reads the {sorted(_MODEL_NAMES)} family)")
    out["model"] = model
    if "optimizer" in init:
        opt_name, opt = _one_entry(init.pop("optimizer"), "trainer.init.optimizer")
        out["optimizer"] = {"optimizer_type": opt_name, **opt}
    if "schedulers" in init:
        scheds = init.pop("schedulers")
        if not isinstance(scheds, list) or len(scheds) != 1:
            raise ValueError("trainer.init.schedulers: expected a list with one scheduler (several schedulers "
                             "for different parameter groups are not supported)")
        if "optimizer" not in out:
            raise ValueError("trainer.init.schedulers: given without trainer.init.optimizer")
        out["optimizer"]["learning_rate"] = _schedule_from_trainer(scheds[0], "trainer.init.schedulers[0]")
    for key, value in (init.pop("precision", None) or {}).items():
        if key not in _PRECISION_KEYS:
            raise ValueError(f"trainer.init.precision.{key}: not a known precision key")
        target = _PRECISION_KEYS[key]
        if target is None:
            ignored.append(f"precision.{key}")
            continue
        out.setdefault(target[0], {})[target[1]] = value
    for section, mapping in (("loop", _LOOP_KEYS), ("checkpoint", _CHECKPOINT_KEYS)):
        for key, value in (init.pop(section, None) or {}).items():
            if key not in mapping:
                raise ValueError(f"trainer.init.{section}.{key}: not supported (known: {sorted(mapping)})")
            out["runconfig"][mapping[key]] = value
    for key, value in (init.pop("logging", None) or {}).items():
        if key not in ("log_steps", "log_level"):
            raise ValueError(f"trainer.init.logging.{key}: not supported (known: log_steps, log_level)")
        out["runconfig"]["log_steps" if key == "log_steps" else "logging"] = value
    if "seed" in init:
        out["runconfig"]["seed"] = init.pop("seed")
    if "backend" in init:
        init.pop("backend")
        ignored.append("backend")
    for i, cb in enumerate(init.pop("callbacks", None) or []):
        cb_name = next(iter(cb)) if isinstance(cb, dict) and len(cb) == 1 else cb
        if cb_name == "Lora":  # Model Zoo >= 2.4 spells model.lora_params as this callback
            lora_args = cb["Lora"] or {}
            if set(lora_args) != {"lora_params"}:
                raise ValueError(f"trainer.init.callbacks[{i}].Lora: expected only 'lora_params'")
            out["model"]["lora_params"] = lora_args["lora_params"]
            continue
        if cb_name not in _IGNORED_CALLBACKS:
            raise ValueError(f"trainer.init.callbacks[{i}]: callback {cb_name!r} is not supported")
        ignored.append(f"callbacks.{cb_name}")
    for key in init:
        raise ValueError(f"trainer.init.{key}: not supported by btlm run")
    fit = dict(trainer.get("fit") or {})
    validate = dict(trainer.get("validate") or {})
    # validate_all names the same eval data (its checkpoints come from btlm run --mode eval_all).
    if "train_dataloader" in fit:
        out["train_input"] = fit.pop("train_dataloader")
    val = fit.pop("val_dataloader", None) or validate.pop("val_dataloader", None)
    if isinstance(val, list):
        if len(val) != 1:
            raise ValueError("trainer.fit.val_dataloader: several validation dataloaders are not supported")
        val = val[0]
    if val is not None:
        out["eval_input"] = val
    for key in fit:
        raise ValueError(f"trainer.fit.{key}: not supported (known: train_dataloader, val_dataloader)")
    if ignored:
        log.info("Ignoring Cerebras-only trainer keys: %s", ", ".join(f"trainer.init.{k}" for k in ignored))
    return out


def parse_params(raw: dict, source: str = "<params>") -> Params:
    """Validate an already-loaded params dict; raises :class:`ConfigError` naming the bad key.

    A Model Zoo 2.x ``trainer:`` YAML is first mapped to the 2.0-2.1 sections (:func:`trainer_to_params`).
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with sections model/optimizer/runconfig, got {type(raw).__name__}")
    if "trainer" in raw:
        try:
            raw = trainer_to_params(raw)
        except ValueError as err:
            raise ConfigError(f"{source}: {err}") from None
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(source, err)) from None


def load_params(path: str | Path) -> tuple[Params, dict]:
    """Read and validate a params YAML; returns the validated object and the raw dict (for a 2.x
    ``trainer:`` YAML: its mapping to the 2.0-2.1 sections)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read params file ({err.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if isinstance(raw, dict) and "trainer" in raw:
        # The raw dict handed on (CLI overrides, the run's params copy, checkpoints) is the mapped one.
        try:
            raw = trainer_to_params(raw)
        except ValueError as err:
            raise ConfigError(f"{path}: {err}") from None
    return parse_params(raw, str(path)), raw
