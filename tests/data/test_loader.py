"""GptHDF5MapDataProcessor: batches, determinism, rank disjointness/coverage, exact mid-epoch resume; tools."""

import numpy as np
import pytest
import torch
from conftest import read_rows

from btlm.data import DataError, GptHDF5MapDataProcessor
from btlm.cli import main as btlm_main


def _ids(batches):
    """Identify samples by their input ids (the corpus has no repeated row)."""
    return [r.numpy().tobytes() for b in batches for r in b["input_ids"]]


def _params(prepared, **kw):
    return {"data_dir": str(prepared[0]), "batch_size": 4, "shuffle": False, "num_workers": 0, **kw}


def test_batches_are_the_shards_rows_in_order(prepared):
    rows = read_rows(prepared[0])
    dl = GptHDF5MapDataProcessor(_params(prepared, drop_last=False, data_processor="GptHDF5MapDataProcessor"))
    batches = list(dl)
    b = batches[0]
    assert set(b) == {"input_ids", "attention_mask", "labels"}
    assert all(v.dtype == torch.int32 and v.shape == (4, 32) for v in b.values())
    got = torch.cat([torch.stack([x["input_ids"], x["attention_mask"], x["labels"]], 1) for x in batches]).numpy()
    np.testing.assert_array_equal(got, rows)  # drop_last False: every row exactly once, in corpus order
    assert dl.create_dataloader() is dl


def test_shuffle_is_deterministic_per_seed(prepared):
    a = _ids(GptHDF5MapDataProcessor(_params(prepared, shuffle=True, shuffle_seed=7)))
    b = _ids(GptHDF5MapDataProcessor(_params(prepared, shuffle=True, shuffle_seed=7)))
    c = _ids(GptHDF5MapDataProcessor(_params(prepared, shuffle=True, shuffle_seed=8)))
    plain = _ids(GptHDF5MapDataProcessor(_params(prepared)))
    assert a == b and a != c and a != plain and sorted(a) != a


def test_ranks_are_disjoint_and_cover_the_global_order(prepared):
    single = GptHDF5MapDataProcessor(_params(prepared, batch_size=12, shuffle=True, shuffle_seed=1), rank=0, world_size=1)
    ranks = [GptHDF5MapDataProcessor(_params(prepared, shuffle=True, shuffle_seed=1), rank=r, world_size=3)
             for r in range(3)]
    per_rank = [list(dl) for dl in ranks]
    assert len({len(p) for p in per_rank}) == 1 and len(per_rank[0]) == len(ranks[0])
    sets = [set(_ids(p)) for p in per_rank]
    assert not (sets[0] & sets[1]) and not (sets[1] & sets[2]) and not (sets[0] & sets[2])
    # step by step, rank r holds the r-th quarter-batch of the world-size-1 global batch
    interleaved = [s for step in zip(*per_rank) for s in _ids(list(step))]
    assert interleaved == _ids(list(single))
    assert ranks[1].state_dict() == single.state_dict()  # global sample count, world-size independent


def test_drop_last_carries_the_tail_into_the_next_pass(prepared):
    n = len(read_rows(prepared[0]))
    dl = GptHDF5MapDataProcessor(_params(prepared, batch_size=5))
    first, second = _ids(list(dl)), _ids(list(dl))
    assert len(first) == n // 5 * 5 and dl.state_dict()["samples_streamed"] == 2 * (n // 5 * 5)
    whole = _ids(list(GptHDF5MapDataProcessor(_params(prepared, drop_last=False, batch_size=1))))
    assert first + second[: n - len(first)] == whole  # nothing dropped: the tail starts the second pass


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_continues_at_the_next_sample(prepared, workers):
    p = _params(prepared, shuffle=True, shuffle_seed=3)
    ref = list(GptHDF5MapDataProcessor(p))
    dl = GptHDF5MapDataProcessor(p)
    it = iter(dl)
    seen = [next(it) for _ in range(3)]
    state = dl.state_dict()
    assert state == {"samples_streamed": 12, "seed": 3}
    resumed = GptHDF5MapDataProcessor({**p, "num_workers": workers})
    resumed.load_state_dict(state)
    assert len(resumed) == len(ref) - 3
    assert _ids(seen) + _ids(list(resumed)) == _ids(ref)
    with pytest.raises(DataError, match="shuffle_seed"):
        GptHDF5MapDataProcessor({**p, "shuffle_seed": 4}).load_state_dict(state)
    with pytest.raises(DataError, match="keys"):
        dl.load_state_dict({"samples_streamed": 1})


def test_mixture_follows_the_weights(prepared, corpus, tmp_path):
    from conftest import prepare

    prepare(corpus[0], tmp_path / "b", max_seq_length=32, files_per_record=1000)
    p = {"mixture": [{"data_dir": str(prepared[0]), "weight": 0.75}, {"data_dir": str(tmp_path / "b"), "weight": 0.25,
                                                                       "data_subset": "0.0-0.5"}],
         "batch_size": 8, "shuffle_seed": 2}
    dl = GptHDF5MapDataProcessor(p)
    n_a, n_b = len(read_rows(prepared[0])), len(read_rows(tmp_path / "b")) // 2
    epoch = max(np.ceil(n_a / 0.75), np.ceil(n_b / 0.25))  # Model Zoo: max(len_d / w_d)
    assert len(dl.dataset) == epoch
    assert np.bincount(dl.dataset._which).tolist() == [round(0.75 * epoch), round(0.25 * epoch)]
    assert _ids(list(dl)) == _ids(list(GptHDF5MapDataProcessor(p)))


def test_bad_loader_params(prepared, tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        GptHDF5MapDataProcessor({"data_dir": str(tmp_path / "nope"), "batch_size": 2})
    with pytest.raises(DataError, match="no .h5"):
        GptHDF5MapDataProcessor({"data_dir": str(tmp_path), "batch_size": 2})
    with pytest.raises(DataError, match="max_sequence_length 2048 does not match the data's 32"):
        GptHDF5MapDataProcessor(_params(prepared, max_sequence_length=2048))
    with pytest.raises(DataError, match="unknown data loader keys"):
        GptHDF5MapDataProcessor(_params(prepared, batchsize=3))


def test_inspect_and_shuffle(prepared, tmp_path, capsys):
    assert data_main(["inspect", str(prepared[0])]) == 0
    out = capsys.readouterr().out
    n = len(read_rows(prepared[0]))
    assert f"{n} sequences x 32 tokens" in out and "row 0 decoded" in out and "n_examples attrs ok" in out
    for name in ("s1", "s2"):
        assert data_main(["shuffle", str(prepared[0]), str(tmp_path / name), "--seed", "5",
                          "--num_output_chunks", "3"]) == 0
    a, b, orig = read_rows(tmp_path / "s1"), read_rows(tmp_path / "s2"), read_rows(prepared[0])
    np.testing.assert_array_equal(a, b)  # same seed, same files
    assert not np.array_equal(a, orig)
    key = lambda r: sorted(map(bytes, r))  # noqa: E731  same rows, other order
    assert key(a) == key(orig)
    assert data_main(["shuffle", str(prepared[0]), str(tmp_path / "s1"), "--seed", "5"]) == 1  # runtime error
    assert "error:" in capsys.readouterr().err


def data_main(argv: list[str]) -> int:
    """``btlm data ARGV`` in this process."""
    return btlm_main(["data", *argv])
