"""The keys of a ``train_input`` / ``eval_input`` section that :class:`~btlm.data.loader.GptHDF5MapDataProcessor`
reads (Model Zoo names), with their types and defaults, declared once: the loader takes its key set and
defaults from :class:`LoaderConfig`, and the training params' ``InputConfig`` extends it.

Light to import (pydantic only), so the training params can be checked without torch's data loader.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, NonNegativeInt, PositiveInt

#: Model Zoo keys that only matter on Cerebras hardware (accepted and ignored by the loader).
IGNORED_KEYS = frozenset({"data_processor", "use_worker_cache", "micro_batch_size", "repeat", "pad_last", "use_vsl"})


class LoaderConfig(BaseModel):
    """What the loader reads. ``prefetch_factor`` and ``persistent_workers`` apply only with ``num_workers`` > 0
    (torch rejects them without workers)."""

    model_config = ConfigDict(extra="forbid")

    data_dir: Union[str, list[str], None] = None
    mixture: Optional[list[dict[str, Any]]] = None  # [{data_dir, weight, data_subset?}, ...]
    batch_size: PositiveInt  # per process
    shuffle: bool = False
    shuffle_seed: int = 0
    num_workers: NonNegativeInt = 0
    drop_last: bool = True
    num_samples: Optional[PositiveInt] = None  # None: the dataset length
    sort_files: bool = True
    max_sequence_length: Optional[PositiveInt] = None  # checked against the data
    data_subset: Optional[str] = None  # "0.0-0.5,0.7-1.0"
    prefetch_factor: PositiveInt = 10
    persistent_workers: bool = True
    pin_memory: bool = False


KNOWN_KEYS = frozenset(LoaderConfig.model_fields)
#: The default of every key that has one (``batch_size`` has none).
DEFAULTS = {k: f.default for k, f in LoaderConfig.model_fields.items() if not f.is_required()}
