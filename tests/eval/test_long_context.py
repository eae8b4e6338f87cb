"""btlm eval-long: per-position loss curves agree with direct loss computations; scaling math; data input; CLI."""

import json
import resource
import threading

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from btlm.eval.common import EvalError, ScalingSetting, parse_scaling
from btlm.eval.long_context import load_windows, per_token_loss, position_curves, smooth_log
from tests.conftest import make_model

torch.set_num_threads(1)
V = 97


def _windows(n=3, t=96, seed=0):
    return torch.randint(0, V, (n, t), generator=torch.Generator().manual_seed(seed))


def _direct_curve(model, windows):
    """Per-position mean loss from full logits of an ordinary forward (no chunking)."""
    with torch.no_grad():
        logits = model(windows).logits[:, :-1].float()
    return F.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none").double().mean(0).numpy()


def test_curve_length_and_equality_with_direct_loss():
    model = make_model("eager")
    windows = _windows()
    curves = position_curves(model, windows, [parse_scaling("none")], logits_chunk=7, progress=False)
    curve = curves["none"]
    assert curve.shape == (windows.shape[1] - 1,)
    np.testing.assert_allclose(curve, _direct_curve(model, windows), rtol=1e-5, atol=1e-5)
    # The mean over positions is exactly the model's own shifted LM loss.
    with torch.no_grad():
        loss = model(windows, labels=windows).loss.item()
    assert curve.mean() == pytest.approx(loss, rel=1e-5)


def test_chunked_sdpa_path_matches_eager_per_token():
    model = make_model("sdpa", attn_chunk_size=16)
    ids = _windows(1, 200)
    with torch.no_grad():
        chunked = per_token_loss(model, ids, logits_chunk=33)[0].numpy()
    np.testing.assert_allclose(chunked, _direct_curve(make_model("eager"), ids), rtol=1e-4, atol=1e-4)


def test_fixed_factor_equals_model_configured_with_that_factor():
    windows = _windows()
    model = make_model("eager")
    curves = position_curves(model, windows, [parse_scaling("none"), parse_scaling("fixed:4")], progress=False)
    reference = make_model("eager", alibi_scaling={"type": "linear", "factor": 4.0})
    np.testing.assert_allclose(curves["fixed:4"], _direct_curve(reference, windows), rtol=1e-5, atol=1e-5)
    assert not np.allclose(curves["fixed:4"], curves["none"])  # the slopes really changed


def test_dynamic_scaling_math():
    windows = _windows(2, 129)  # the model reads 128 tokens
    model = make_model("eager")
    settings = [parse_scaling(s) for s in ("none", "fixed:1", "dynamic:128", "dynamic:512", "dynamic:32", "fixed:4")]
    curves = position_curves(model, windows, settings, progress=False)
    # Dynamic with a training length >= the window divides by 1: identical to none (and so is fixed:1).
    np.testing.assert_array_equal(curves["dynamic:128"], curves["none"])
    np.testing.assert_array_equal(curves["dynamic:512"], curves["none"])
    np.testing.assert_array_equal(curves["fixed:1"], curves["none"])
    # Past it, the divisor is K / L = 128 / 32 = 4 for the whole window: the same as fixed:4.
    np.testing.assert_allclose(curves["dynamic:32"], curves["fixed:4"], rtol=1e-6)
    assert not np.allclose(curves["dynamic:32"], curves["none"])


def test_parse_scaling():
    assert parse_scaling("none") == ScalingSetting("none", None)
    assert parse_scaling("fixed:2.5").alibi_scaling == {"type": "linear", "factor": 2.5}
    assert parse_scaling("dynamic:8k").alibi_scaling == {"type": "linear", "train_seq_len": 8192}
    for bad in ("fixed:0.5", "fixed:x", "dynamic:1", "cubic:2", "dynamic:"):
        with pytest.raises(EvalError, match="scaling|length"):
            parse_scaling(bad)


def _write_shard(path, tokens, msl=64, pad_tail=0):
    """A btlm-data style shard: rows [input_ids, attention_mask, labels], the last row padded by pad_tail."""
    rows = tokens.reshape(-1, msl)
    mask = np.ones_like(rows)
    if pad_tail:
        rows[-1, -pad_tail:] = 0
        mask[-1, -pad_tail:] = 0
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=np.stack([rows, mask, rows], axis=1).astype(np.int32))


def test_load_windows_from_h5_shards_in_order(tmp_path):
    tokens = np.arange(64 * 6) % V
    _write_shard(tmp_path / "examples_00000.h5", tokens[:256].copy())
    _write_shard(tmp_path / "examples_00001.h5", tokens[256:].copy(), pad_tail=10)
    windows = load_windows(str(tmp_path), context=100)
    # 384 - 10 padding = 374 real tokens: windows of 101 tokens with stride 100 (Model Zoo rows of msl 100)
    assert windows.shape == (3, 101)
    for i in range(3):
        np.testing.assert_array_equal(windows[i].numpy(), tokens[100 * i: 100 * i + 101])
    assert load_windows(str(tmp_path), context=100, num_windows=2).shape == (2, 101)
    with pytest.warns(DeprecationWarning, match="use num_windows"):  # the old name still works
        assert load_windows(str(tmp_path), context=100, num_docs=2).shape == (2, 101)
    assert load_windows(str(tmp_path), context=373).shape == (1, 374)  # exactly one window's tokens
    with pytest.raises(EvalError, match="fewer than one window"):
        load_windows(str(tmp_path), context=374)
    with pytest.raises(EvalError, match="fewer than one window"):
        load_windows(str(tmp_path / "examples_00000.h5"), context=1000)


def test_num_docs_is_a_deprecated_name_of_num_windows(capsys):
    from btlm.cli.eval import build_parser

    base = ["--model", "m", "--data", "d", "--out", "o"]
    assert build_parser("eval-long").parse_args(base + ["--num-windows", "3"]).num_windows == 3
    assert "deprecated" not in capsys.readouterr().err
    assert build_parser("eval-long").parse_args(base + ["--num_docs", "2"]).num_windows == 2
    assert "--num-docs is deprecated: use --num-windows" in capsys.readouterr().err


def test_load_windows_from_jsonl_and_errors(tmp_path, tokenizer):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"document number {i} says hello."}) for i in range(20)))
    stream = []
    for i in range(20):
        stream += tokenizer.encode(f"document number {i} says hello.") + [tokenizer.eos_token_id]
    windows = load_windows(str(path), context=16, tokenizer=tokenizer)
    assert windows.shape == ((len(stream) - 1) // 16, 17)
    for i, w in enumerate(windows):
        np.testing.assert_array_equal(w.numpy(), stream[16 * i: 16 * i + 17])
    with pytest.raises(EvalError, match="does not exist"):
        load_windows(str(tmp_path / "missing.h5"), 16)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(EvalError, match="bad.jsonl"):
        load_windows(str(bad), 1000, tokenizer=tokenizer)


def test_smooth_log_keeps_constants_and_length():
    values = np.full(1000, 3.0)
    assert np.allclose(smooth_log(values), 3.0) and len(smooth_log(values)) == 1000


def _current_rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def test_cli_16k_tokens_bounded_memory(tmp_path):
    """A 16k-token evaluation of a tiny 1-layer model through the CLI within bounded memory: full
    [H, T, T] fp32 attention scores alone would need 4 GiB."""
    from btlm.inference import save_model
    from btlm.model import BTLMLMHeadModel, config_from_preset

    torch.manual_seed(0)
    save_model(BTLMLMHeadModel(config_from_preset("tiny", n_layer=1, vocab_size=V, n_positions=512)), tmp_path / "m")
    context = 16384
    _write_shard(tmp_path / "shard.h5", np.random.default_rng(0).integers(0, V, 64 * 257), pad_tail=0)
    out = tmp_path / "out"
    from btlm.cli import main as btlm

    rss_before, peak, done = _current_rss_gib(), [0.0], threading.Event()

    def sample():  # the process-wide ru_maxrss may come from earlier tests, so sample RSS ourselves
        while not done.wait(0.005):
            peak[0] = max(peak[0], _current_rss_gib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        assert btlm(["eval-long", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "shard.h5"), "--context", str(context),
                     "--num-windows", "1", "--alibi-scaling", "dynamic:512", "--out", str(out)]) == 0
    finally:
        done.set()
        sampler.join()
    assert peak[0] - rss_before < 1.5, f"evaluation grew RSS by {peak[0] - rss_before:.2f} GiB"
    lines = (out / "loss_by_position.csv").read_text().splitlines()
    # --context N scores N positions (a window of N + 1 tokens): header + 16384 rows
    assert lines[0] == "position,dynamic:512" and len(lines) == context + 1 and lines[-1].startswith(f"{context},")
    summary = json.loads((out / "loss_by_position.json").read_text())
    assert summary["trained_n_positions"] == 512 and len(summary["settings"][0]["loss_by_position"]) == context
    assert (out / "loss_by_position.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_bad_input_is_one_error_line(tmp_path, capsys):
    from btlm.cli import main as btlm

    assert btlm(["eval-long", "--model", str(tmp_path), "--data", str(tmp_path / "nope.h5"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "nope.h5" in err
    assert btlm(["eval-long", "--model", str(tmp_path), "--data", str(tmp_path), "--alibi-scaling", "fixed:0.5",
                 "--out", str(tmp_path / "o")]) == 1
    assert "fixed:0.5" in capsys.readouterr().err


def test_context_n_scores_n_positions_like_a_model_zoo_row():
    """A window of N + 1 tokens gives N losses: the model reads N tokens and each predicts the next one,
    which is the per-token loss of a Model Zoo row of msl N (input_ids = w[:-1], labels = w[1:])."""
    model = make_model("eager")
    window = _windows(1, 33)
    with torch.no_grad():
        got = per_token_loss(model, window, logits_chunk=5)[0]
        logits = model(window[:, :-1]).logits[0].float()
    assert got.shape == (32,)
    torch.testing.assert_close(got, F.cross_entropy(logits, window[0, 1:], reduction="none"), rtol=1e-5, atol=1e-5)


def test_plot_has_a_panel_of_each_setting_minus_none():
    from btlm.eval.long_context import differences, make_figure

    rng = np.random.default_rng(0)
    base = 3 + rng.normal(0, 4, 500)  # noisy per-position means spanning many nats ...
    curves = {"fixed:4": base + 0.05, "none": base, "dynamic:128": base - 0.02}  # ... settings 0.02-0.05 apart
    ref, diffs = differences(curves)
    assert ref == "none" and set(diffs) == {"fixed:4", "dynamic:128"}
    np.testing.assert_allclose(diffs["fixed:4"], 0.05)
    meta = {"model": "m", "context": 500, "num_windows": 2, "trained_n_positions": 128}
    fig = make_figure(curves, meta)
    top, bottom = fig.axes
    assert "none" in bottom.get_ylabel()
    smooth = {line.get_label().split(" ")[0]: line.get_ydata() for line in bottom.get_lines()
              if "mean" in str(line.get_label())}
    assert set(smooth) == {"fixed:4", "dynamic:128"}
    np.testing.assert_allclose(smooth["fixed:4"], 0.05, atol=1e-9)
    np.testing.assert_allclose(smooth["dynamic:128"], -0.02, atol=1e-9)
    lo, hi = bottom.get_ylim()
    assert -0.1 < lo < -0.05 and 0.05 < hi < 0.1  # scaled to the differences, not to the 0-17 nat spread
    assert len(make_figure({"none": base}, meta).axes) == 1  # one setting: nothing to compare
