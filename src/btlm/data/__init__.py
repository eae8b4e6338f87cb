"""BTLM data pipeline: raw text → HDF5 shards (Model Zoo layout) → deterministic, resumable loader.

* ``btlm data LMData …`` (:mod:`btlm.data.create_hdf5_dataset`) writes ``[n, 3, msl]`` int32 shards.
* :class:`GptHDF5MapDataProcessor` reads them as a ``DataLoader`` of ``input_ids`` / ``attention_mask`` /
  ``labels`` with ``state_dict()`` / ``load_state_dict()`` for exact mid-epoch resume.
* ``btlm data inspect`` / ``btlm data shuffle`` (:mod:`btlm.data.tools`).

The loader (and torch) is imported lazily, so data preparation workers stay light.
"""

from btlm.data.readers import DataError

__all__ = ["DataError", "GptHDF5MapDataProcessor", "H5SampleDataset"]


def __getattr__(name):
    if name in ("GptHDF5MapDataProcessor", "H5SampleDataset"):
        from btlm.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'btlm.data' has no attribute {name!r}")
