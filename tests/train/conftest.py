"""Shared fixtures for the training-runner tests: tiny params and tiny HDF5 data in the Model Zoo layout."""

from __future__ import annotations

import copy
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # the cores are shared; small models do not gain from threads


def write_h5_dir(path: Path, n_rows: int, msl: int, vocab: int = 97, seed: int = 0, files: int = 2) -> Path:
    """HDF5 shards like `btlm data LMData` writes: dataset ``data`` (n, 3, msl) int32 + ``n_examples``.

    Rows follow a learnable pattern (next = (3*cur + 1) % vocab) so the loss visibly falls.
    """
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = np.empty((n_rows, 3, msl), dtype=np.int32)
    for i in range(n_rows):
        seq = [int(rng.integers(vocab))]
        for _ in range(msl):
            seq.append((3 * seq[-1] + 1) % vocab)
        seq = np.array(seq, dtype=np.int32)
        rows[i, 0], rows[i, 1], rows[i, 2] = seq[:-1], 1, seq[1:]
    for f, chunk in enumerate(np.array_split(rows, files)):
        with h5py.File(path / f"examples_{f}_0.h5", "w") as h5:
            h5.create_dataset("data", data=chunk, chunks=(1, 3, msl), compression="gzip")
            h5.attrs["n_examples"] = len(chunk)
    return path


TINY = {
    "train_input": {"data_processor": "GptHDF5MapDataProcessor", "data_dir": None, "batch_size": 4,
                    "shuffle": False, "num_workers": 0},
    "eval_input": {"data_processor": "GptHDF5MapDataProcessor", "data_dir": None, "batch_size": 4,
                   "shuffle": False, "num_workers": 0},
    "model": {
        "hidden_size": 32, "num_hidden_layers": 2, "num_heads": 4, "filter_size": 64, "vocab_size": 97,
        "max_position_embeddings": 16, "position_embedding_type": "alibi", "nonlinearity": "swiglu",
        "dropout_rate": 0.0, "embeddings_scale": 14.6, "output_logits_scale": 0.444, "scale_qk_dot_by_d": True,
        "embedding_initializer": {"name": "truncated_normal", "mean": 0.0, "std": 0.073, "a": -0.146, "b": 0.146},
        "initializer": {"name": "truncated_normal", "mean": 0.0, "std": 0.05},
        "output_layer_initializer": {"name": "truncated_normal", "mean": 0.0, "std": 0.02},
        "loss_scaling": "batch_size", "loss_weight": 0.0625,
    },
    "optimizer": {
        "optimizer_type": "AdamW", "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1,
        "max_gradient_norm": 1.0, "correct_bias": True,
        "learning_rate": [
            {"scheduler": "Linear", "initial_learning_rate": 0.0, "end_learning_rate": 0.01, "total_iters": 2},
            {"scheduler": "Linear", "initial_learning_rate": 0.01, "end_learning_rate": 0.001, "total_iters": 20},
        ],
        "adjust_learning_rate": {"decoder_kernel": 0.2},
    },
    "runconfig": {"max_steps": 6, "checkpoint_steps": 3, "log_steps": 1, "seed": 1, "eval_steps": 2,
                  "peak_flops": 1.0e10},  # a stated peak: skips the roofline measurement in tests
}


@pytest.fixture
def tiny_raw(tmp_path):
    """Raw params dict for a 2-layer ALiBi/SwiGLU/muP model on 16-token HDF5 rows (train 48 rows, eval 8)."""
    raw = copy.deepcopy(TINY)
    raw["train_input"]["data_dir"] = str(write_h5_dir(tmp_path / "train", 48, 16, seed=0))
    raw["eval_input"]["data_dir"] = str(write_h5_dir(tmp_path / "eval", 8, 16, seed=1, files=1))
    return raw
