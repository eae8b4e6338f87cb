"""Training and evaluation of Model Zoo BTLM configs with PyTorch (``btlm run``, ``btlm convert``).

* :mod:`btlm.train.config` — pydantic schema of the params YAML (``load_params``, ``ConfigError``)
* :mod:`btlm.train.zoo_model` — ``model:`` section → ``BTLMConfig``, Model Zoo init, the loss
* :mod:`btlm.train.optim` — param groups, cstorch AdamW, ``ScheduledLR``
* :mod:`btlm.train.trainer` — ``Runner``: train / eval / eval_all / train_and_eval
* :mod:`btlm.train.outputs` — ``Checkpointer`` (resume, save, prune) and ``MetricsWriter`` (TensorBoard)
* :mod:`btlm.train.launch` — ``btlm run``'s logic: params + command-line overrides, lock, torchrun relaunch
* :mod:`btlm.train.mup` — muP coordinate check and learning-rate sweep (``btlm mup``)
* :mod:`btlm.train.checkpoint` — atomic, weights_only-safe checkpoints; retention; auto-resume
* :mod:`btlm.train.distributed` — DDP / FSDP2 and torch.distributed.checkpoint
* :mod:`btlm.train.convert` — checkpoints ↔ the released HF layout
"""
