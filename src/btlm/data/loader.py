"""``GptHDF5MapDataProcessor``: the Model Zoo HDF5 "map" loader, deterministic, rank-aware and resumable.

Reads the ``[n, 3, msl]`` int32 shards written by ``btlm data LMData`` (or the Model Zoo's
``create_hdf5_dataset.py``) and yields dicts ``input_ids``, ``attention_mask``, ``labels`` (int32
``[batch, msl]``; labels are already shifted, ``attention_mask`` is the loss mask).

Sample order (identical to the Model Zoo's ``CBSampler`` design):

* The global sample stream is epoch after epoch of ``num_samples`` indices (default: the dataset
  length): ``0, 1, 2, …`` or, with ``shuffle``, ``torch.randperm(num_samples, seed=shuffle_seed + epoch)``
  (indices past the dataset length wrap around, so ``num_samples`` may exceed it).
* One step consumes a *global* batch of ``batch_size × world_size`` consecutive stream samples; rank r
  takes the r-th block of ``batch_size``. Ranks are disjoint and together cover the stream, and the
  global order does not depend on the world size or on ``num_workers`` (batches are formed in the
  main process).
* ``drop_last=True`` (default) never drops data: a pass over the loader yields
  ``num_samples // (batch_size × world_size)`` batches and the incomplete tail starts the next pass.
  ``drop_last=False`` ends each epoch with one short batch (split across ranks).

State (``state_dict()``) is the Model Zoo checkpoint format ``{"samples_streamed": S, "seed": shuffle_seed}``
where ``S`` counts *global* stream samples handed out (all ranks together) up to and including the
last batch this loader yielded. ``load_state_dict`` continues at sample ``S`` exactly: with another
``num_workers``, and with another world size as long as ``S`` is a multiple of the new global batch.
"""

from __future__ import annotations

import glob
import math
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from btlm.data.loader_config import DEFAULTS, IGNORED_KEYS, KNOWN_KEYS  # noqa: F401 (re-exported)
from btlm.data.readers import DataError


def _h5_files(data_dir: str, sort_files: bool) -> list[str]:
    if not os.path.isdir(data_dir):
        raise DataError(f"data_dir {data_dir!r} is not a directory")
    files = glob.glob(os.path.join(data_dir, "*.h5"))  # not recursive, like the Model Zoo reader
    if not files:
        raise DataError(f"data_dir {data_dir!r} holds no .h5 files")
    return sorted(files) if sort_files else files


def _parse_subset(spec: str) -> list[tuple[float, float]]:
    """``"0.0-0.5,0.7-1.0"`` → [(0.0, 0.5), (0.7, 1.0)] (monotone ranges within [0, 1])."""
    out, last = [], 0.0
    for part in str(spec).split(","):
        try:
            a, b = (float(x) for x in part.split("-"))
        except ValueError as e:
            raise DataError(f"data_subset {spec!r}: expected ranges like '0.0-0.5,0.7-1.0'") from e
        if not (last <= a <= b <= 1.0):
            raise DataError(f"data_subset {spec!r}: ranges must be increasing and within [0, 1]")
        out.append((a, b))
        last = b
    return out


class H5SampleDataset(Dataset):
    """Rows of every ``*.h5`` file in ``data_dirs`` (sample format ``[n, 3, msl]``), as one map-style dataset.

    Files are opened lazily in each process (h5py handles must not cross a fork).
    """

    def __init__(self, data_dirs: str | list[str], sort_files: bool = True, max_sequence_length: int | None = None,
                 data_subset: str | None = None):
        import h5py

        dirs = [data_dirs] if isinstance(data_dirs, str) else list(data_dirs)
        self.files = [f for d in dirs for f in _h5_files(d, sort_files)]
        counts, shape = [], None
        for f in self.files:
            try:
                with h5py.File(f, "r") as h:
                    ds = h["data"]
                    if ds.ndim != 3:
                        raise DataError(f"{f}: dataset 'data' has shape {ds.shape}; expected (n, 3, msl) sample format")
                    if ds.dtype != np.int32:  # float rows would be cast to ids and train to nonsense
                        raise DataError(f"{f}: dataset 'data' has dtype {ds.dtype}; expected int32 token ids "
                                        "(as btlm data LMData writes them)")
                    if shape is not None and ds.shape[1:] != shape:
                        raise DataError(f"{f}: rows of shape {ds.shape[1:]} differ from {shape} in {self.files[0]}")
                    shape = ds.shape[1:]
                    counts.append(ds.shape[0])
            except (OSError, KeyError) as e:
                raise DataError(f"{f}: not a readable shard with a 'data' dataset ({e})") from e
        if shape[0] < 3:
            raise DataError(f"{self.files[0]}: rows have {shape[0]} features; expected input_ids, attention_mask, labels")
        self.msl = int(shape[1])
        if max_sequence_length is not None and int(max_sequence_length) != self.msl:
            raise DataError(f"max_sequence_length {max_sequence_length} does not match the data's {self.msl} "
                            f"({self.files[0]})")
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        total = int(self._offsets[-1])
        self._rows = None
        if data_subset:
            self._rows = np.concatenate([np.arange(int(a * total), int(b * total)) for a, b in _parse_subset(data_subset)])
        self._handles: dict = {}
        self._pid = None

    def __len__(self) -> int:
        return int(self._offsets[-1]) if self._rows is None else len(self._rows)

    def __getstate__(self):
        return {**self.__dict__, "_handles": {}, "_pid": None}

    def _dataset(self, i: int):
        import h5py

        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        if i not in self._handles:
            self._handles[i] = h5py.File(self.files[i], "r")["data"]
        return self._handles[i]

    def read(self, indices) -> np.ndarray:
        """Rows ``[len(indices), 3, msl]`` int32 for dataset indices, in the order given."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"index out of range for a dataset of {len(self)} rows")
        rows = idx if self._rows is None else self._rows[idx]
        out = np.empty((len(rows), 3, self.msl), dtype=np.int32)
        fidx = np.searchsorted(self._offsets, rows, side="right") - 1
        for f in np.unique(fidx):
            sel = np.nonzero(fidx == f)[0]
            local = rows[sel] - self._offsets[f]
            ds = self._dataset(int(f))
            if len(local) > 1 and np.all(np.diff(local) == 1):
                out[sel] = ds[int(local[0]): int(local[-1]) + 1, :3]
            else:  # h5py fancy indexing wants increasing unique indices
                uniq, inv = np.unique(local, return_inverse=True)
                out[sel] = ds[uniq.tolist(), :3][inv]
        return out

    def __getitem__(self, i: int) -> np.ndarray:
        return self.read([i])[0]

    def __getitems__(self, indices) -> np.ndarray:  # batched fetch used by DataLoader
        return self.read(indices)


class MixtureDataset(Dataset):
    """Interleave datasets by weight (Model Zoo ``mixture``); each keeps its own order.

    One epoch holds ``max(len_d / w_d)`` samples, ``round(w_d · epoch)`` of them from dataset d (cycling
    through a dataset that is sampled more often than it has rows); the interleave is drawn with
    ``np.random.default_rng(seed)``.
    """

    def __init__(self, datasets: list[H5SampleDataset], weights: list[float], seed: int):
        w = np.asarray(weights, dtype=np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise DataError(f"mixture weights {weights} must be >= 0 and not all 0")
        w = w / w.sum()
        msls = {d.msl for d in datasets}
        if len(msls) != 1:
            raise DataError(f"mixture datasets have different sequence lengths {sorted(msls)}")
        self.msl, self.datasets = msls.pop(), datasets
        total = max(math.ceil(len(d) / wi) for d, wi in zip(datasets, w) if wi > 0)
        counts = np.round(w * total).astype(np.int64)
        which = np.repeat(np.arange(len(datasets)), counts)
        np.random.default_rng(seed).shuffle(which)
        local = np.empty_like(which)
        for d, n in enumerate(counts):
            local[which == d] = np.arange(n) % len(datasets[d])
        self._which, self._local = which, local

    def __len__(self) -> int:
        return len(self._which)

    def read(self, indices) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(idx), 3, self.msl), dtype=np.int32)
        for d in np.unique(self._which[idx]):
            sel = np.nonzero(self._which[idx] == d)[0]
            out[sel] = self.datasets[d].read(self._local[idx[sel]])
        return out

    __getitems__ = read

    def __getitem__(self, i):
        return self.read([i])[0]


class StreamBatchSampler(Sampler):
    """Batches of dataset indices for one rank, from global stream position ``position`` on (see module doc)."""

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, shuffle: bool, seed: int,
                 drop_last: bool, num_samples: int | None):
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch_len = int(num_samples) if num_samples else n
        self.global_batch = batch_size * world_size
        if drop_last and self.epoch_len < self.global_batch:
            raise DataError(f"{self.epoch_len} samples per epoch is fewer than one global batch "
                            f"(batch_size {batch_size} x world_size {world_size}); set drop_last: False")
        self.position = 0
        self._order_cache: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                order = torch.randperm(self.epoch_len, generator=g).numpy()
            else:
                order = np.arange(self.epoch_len)
            self._order_cache = (epoch, order % self.n)
        return self._order_cache[1]

    def stream(self, a: int, b: int) -> np.ndarray:
        """Dataset indices at global stream positions [a, b)."""
        parts = []
        while a < b:
            e, off = divmod(a, self.epoch_len)
            take = min(b - a, self.epoch_len - off)
            parts.append(self._order(e)[off: off + take])
            a += take
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def plan(self) -> list[tuple[int, int, int]]:
        """This pass from the current position: (global batch start, end, position after it) per batch."""
        S, G = self.position, self.global_batch
        if self.drop_last:
            block = (self.epoch_len // G) * G
            end = (S // block + 1) * block
            if end - S < G:  # a misaligned resume left less than one batch: run into the next block
                end += block
            return [(p, p + G, p + G) for p in range(S, end - G + 1, G)]
        end = (S // self.epoch_len + 1) * self.epoch_len
        return [(p, min(p + G, end), min(p + G, end)) for p in range(S, end, G)]

    def rank_share(self, a: int, b: int) -> np.ndarray:
        """This rank's block of the global batch at stream positions [a, b)."""
        if b - a == self.global_batch:
            lo = a + self.rank * self.batch_size
            return self.stream(lo, lo + self.batch_size)
        return np.array_split(self.stream(a, b), self.world)[self.rank]  # short last batch (drop_last False)

    def has_share(self, a: int, b: int) -> bool:
        """Whether this rank gets any sample of the global batch [a, b) (np.array_split sizes for a short one)."""
        m = b - a
        return m // self.world > 0 or self.rank < m % self.world

    def __iter__(self):
        for a, b, _ in self.plan():
            if self.has_share(a, b):
                yield self.rank_share(a, b).tolist()

    def __len__(self) -> int:
        return sum(self.has_share(a, b) for a, b, _ in self.plan())


def collate_rows(rows: np.ndarray) -> dict[str, torch.Tensor]:
    """``[B, 3, msl]`` rows → ``input_ids`` / ``attention_mask`` / ``labels`` int32 tensors ``[B, msl]``."""
    rows = np.ascontiguousarray(rows, dtype=np.int32)
    return {"input_ids": torch.from_numpy(rows[:, 0].copy()), "attention_mask": torch.from_numpy(rows[:, 1].copy()),
            "labels": torch.from_numpy(rows[:, 2].copy())}


def collate_hf(rows) -> dict[str, torch.Tensor]:
    """Model Zoo rows → a ``transformers`` causal-LM batch (a ``data_collator`` for ``Trainer``).

    The rows hold labels already shifted (``labels[t] = input_ids[t+1]``) and a loss mask; HF models shift
    labels themselves (position t predicts ``labels[t+1]``) and skip ``-100``. So the HF labels are the
    row's labels moved one place right, ``-100`` wherever the mask is 0; the loss of a row's last
    position has no place there (a prompt/completion row never has loss there, a packed LMData row
    loses that one token). ``attention_mask`` is all ones: attention stays causal over the row, as in
    ``btlm run`` (right padding changes no earlier position).
    """
    rows = torch.as_tensor(np.ascontiguousarray(np.stack(list(rows)) if isinstance(rows, list) else rows,
                                                dtype=np.int64))
    ids, mask, labels = rows[:, 0], rows[:, 1].bool(), rows[:, 2]
    hf_labels = torch.full_like(ids, -100)
    hf_labels[:, 1:] = torch.where(mask[:, :-1], labels[:, :-1], -100)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": hf_labels}


def _dist_rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class GptHDF5MapDataProcessor(DataLoader):
    """The ``train_input`` / ``eval_input`` loader: ``GptHDF5MapDataProcessor(params)`` *is* the DataLoader.

    ``params`` keys (Model Zoo names, types and defaults: :class:`~btlm.data.loader_config.LoaderConfig`):
    ``data_dir`` (str or list) or ``mixture`` (list of ``{data_dir, weight, data_subset?}``), ``batch_size``
    (per process), ``shuffle``, ``shuffle_seed``, ``num_workers``, ``drop_last``, ``num_samples``,
    ``sort_files``, ``max_sequence_length``, ``data_subset``, ``prefetch_factor``, ``persistent_workers``,
    ``pin_memory``. Cerebras-only keys
    (``data_processor``, ``use_worker_cache``, ``micro_batch_size``, …) are ignored; unknown keys are an error.
    ``rank`` / ``world_size`` default to ``torch.distributed`` when it is initialised, else 0 / 1.
    ``create_dataloader()`` returns ``self`` (Model Zoo API).

    Checkpoint state: ``state_dict() -> {"samples_streamed": int, "seed": int}`` (see the module doc);
    ``load_state_dict(state)`` makes the next batch start at global sample ``samples_streamed``.
    """

    def __init__(self, params: dict, rank: int | None = None, world_size: int | None = None):
        unknown = sorted(set(params) - KNOWN_KEYS - IGNORED_KEYS)
        if unknown:
            raise DataError(f"unknown data loader keys {unknown} (known: {sorted(KNOWN_KEYS)})")
        if params.get("use_vsl"):
            raise DataError("use_vsl: True is not supported (variable-sequence-length data is Cerebras-only)")
        if "batch_size" not in params or int(params["batch_size"]) < 1:
            raise DataError(f"batch_size = {params.get('batch_size')!r}: expected a positive integer")
        params = {**DEFAULTS, **params}
        if rank is None or world_size is None:
            rank, world_size = _dist_rank_world()
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
        self.shuffle_seed = int(params["shuffle_seed"])
        self.shuffle = bool(params["shuffle"])
        self.dataset_is_mixture = bool(params.get("mixture"))
        dataset = self._build_dataset(params)
        sampler = StreamBatchSampler(len(dataset), int(params["batch_size"]), rank, world_size, self.shuffle,
                                     self.shuffle_seed, bool(params["drop_last"]), params.get("num_samples"))
        workers = int(params["num_workers"])
        extra = {}
        if workers > 0:  # torch rejects these two with 0 workers (the Model Zoo resets them there too)
            extra = {"prefetch_factor": int(params["prefetch_factor"]),
                     "persistent_workers": bool(params["persistent_workers"])}
        # An own generator: every iter() of a DataLoader draws a worker base seed from it, which would
        # otherwise come from the global torch RNG and shift the dropout stream of a resumed run
        # (it starts one iterator more than an uninterrupted one). Nothing here is random.
        super().__init__(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate_rows,
                         pin_memory=bool(params["pin_memory"]),
                         generator=torch.Generator().manual_seed(self.shuffle_seed), **extra)

    def _build_dataset(self, params: dict):
        sort_files, msl = bool(params["sort_files"]), params["max_sequence_length"]
        if params.get("mixture"):
            if params.get("data_dir"):
                raise DataError("give either data_dir or mixture, not both")
            parts = params["mixture"]
            for i, m in enumerate(parts):
                if not isinstance(m, dict) or "data_dir" not in m or "weight" not in m:
                    raise DataError(f"mixture[{i}] = {m!r}: expected a mapping with data_dir and weight")
            datasets = [H5SampleDataset(m["data_dir"], sort_files, msl, m.get("data_subset")) for m in parts]
            return MixtureDataset(datasets, [float(m["weight"]) for m in parts], self.shuffle_seed)
        if not params.get("data_dir"):
            raise DataError("data_dir is required (a directory of .h5 shards, or a list of them)")
        return H5SampleDataset(params["data_dir"], sort_files, msl, params.get("data_subset"))

    def create_dataloader(self) -> "GptHDF5MapDataProcessor":
        return self

    def __iter__(self):
        plan = self.batch_sampler.plan()  # the sampler makes the same plan when the DataLoader iterates it
        ends = [after for a, b, after in plan if self.batch_sampler.has_share(a, b)]
        for after, batch in zip(ends, super().__iter__()):
            self.batch_sampler.position = after
            yield batch
        if plan:
            self.batch_sampler.position = plan[-1][2]

    def state_dict(self) -> dict:
        return {"samples_streamed": int(self.batch_sampler.position), "seed": self.shuffle_seed}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"samples_streamed", "seed"}:
            raise DataError(f"dataloader state has keys {sorted(state)}; expected ['samples_streamed', 'seed']")
        if (self.shuffle or self.dataset_is_mixture) and int(state["seed"]) != self.shuffle_seed:
            raise DataError(f"dataloader state was saved with shuffle_seed {state['seed']}, this loader uses "
                            f"{self.shuffle_seed}: the sample order would differ")
        if int(state["samples_streamed"]) < 0:
            raise DataError(f"samples_streamed = {state['samples_streamed']}: expected >= 0")
        self.batch_sampler.position = int(state["samples_streamed"])
