"""bf16 vs fp32 on CPU is chosen from the CPU's facts and a measurement (injected here), and the two users
of the choice (the training runner's mixed_precision, `btlm generate --dtype auto`) follow it."""

import copy
import logging

import pytest
import torch

from btlm import precision
from btlm.precision import CPUFacts, PrecisionChoice, choose_cpu_dtype

AVX2_ZEN = CPUFacts(frozenset({"avx", "avx2", "fma", "sse4_2"}), "AVX2", "x86_64")
EPYC_BF16 = CPUFacts(frozenset({"avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"}), "AVX512", "x86_64")
SAPPHIRE_RAPIDS = CPUFacts(frozenset({"avx512f", "amx_tile", "amx_bf16"}), "AVX512", "x86_64")
ARM_BF16 = CPUFacts(frozenset({"fp", "asimd", "sve", "bf16"}), "SVE256", "aarch64")


def measured(bf16: float, fp32: float):
    calls = []

    def measure(dtype):
        calls.append(dtype)
        return {torch.bfloat16: bf16, torch.float32: fp32}[dtype]

    return measure, calls


def test_no_native_bf16_is_fp32_without_measuring():
    def must_not_measure(dtype):
        raise AssertionError("an emulated bf16 matmul must not be timed")

    choice = choose_cpu_dtype(AVX2_ZEN, must_not_measure)
    assert choice.dtype == torch.float32 and choice.measured is None
    assert "no native bf16" in choice.reason and "AVX2" in choice.reason


@pytest.mark.parametrize("facts,flag", [(EPYC_BF16, "avx512_bf16"), (SAPPHIRE_RAPIDS, "amx_bf16"), (ARM_BF16, "bf16")])
def test_native_bf16_that_measures_faster_is_chosen(facts, flag):
    measure, calls = measured(bf16=410.0, fp32=180.0)  # the EPYC's 2048³ torch.mm
    choice = choose_cpu_dtype(facts, measure)
    assert choice.dtype == torch.bfloat16 and set(calls) == {torch.bfloat16, torch.float32}
    assert flag in choice.reason and "410" in choice.reason and "180" in choice.reason and "2.28x" in choice.reason
    assert choice.measured == {"bf16": 410.0, "fp32": 180.0} and str(choice).startswith("bf16 (")


@pytest.mark.parametrize("bf16", [150.0, 200.0])  # slower, or faster but below MIN_SPEEDUP (1.11x)
def test_native_bf16_that_does_not_measure_faster_is_not_chosen(bf16):
    measure, _ = measured(bf16=bf16, fp32=180.0)
    choice = choose_cpu_dtype(EPYC_BF16, measure)
    assert choice.dtype == torch.float32 and "below the 1.2x" in choice.reason


def test_this_machine_facts_and_measurement_are_real():
    facts = precision.cpu_facts()
    assert isinstance(facts.flags, frozenset) and facts.capability == torch.backends.cpu.get_cpu_capability()
    assert precision.matmul_gflops(torch.float32, n=256, repeats=1) > 0.1
    choice = choose_cpu_dtype()
    assert choice is choose_cpu_dtype()  # measured once per process
    assert choice.dtype in (torch.float32, torch.bfloat16)
    if not precision.NATIVE_BF16_FLAGS & facts.flags:
        assert choice.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_trainer_mixed_precision_on_cpu_follows_the_choice(monkeypatch, tmp_path, dtype):
    from btlm.train.config import load_params
    from btlm.train.trainer import Runner

    from pathlib import Path

    params, raw = load_params(Path(__file__).resolve().parent.parent / "configs" / "params_btlm_tiny_cpu.yaml")
    params.model.mixed_precision = True
    choice = PrecisionChoice(dtype, "injected for the test")
    monkeypatch.setattr(precision, "choose_cpu_dtype", lambda: choice)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("btlm.train")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        autocast = Runner(params, raw, tmp_path / "run", "CPU")._choose_precision()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert autocast == (torch.bfloat16 if dtype == torch.bfloat16 else None)
    assert any("mixed_precision on CPU" in r.getMessage() and "injected for the test" in r.getMessage() for r in records)
    params.model.mixed_precision = False
    assert Runner(params, raw, tmp_path / "run2", "CPU")._choose_precision() is None


@pytest.mark.parametrize("quantized", [False, True])
def test_generate_dtype_auto_follows_the_choice(monkeypatch, tmp_path, capsys, quantized):
    from btlm.cli import main
    from btlm.inference import save_model
    from tests.conftest import make_model

    model = make_model(vocab_size=50257)
    if quantized:
        from btlm.quant import quantize_model

        model = quantize_model(copy.deepcopy(model), bits=4, group_size=32, progress=False)
    save_model(model, tmp_path / "m")
    monkeypatch.setattr(precision, "choose_cpu_dtype",
                        lambda: PrecisionChoice(torch.bfloat16, "injected: native bf16 measured faster"))
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "Hello", "--dtype", "auto",
                 "--max-new-tokens", "3", "--device", "cpu", "--no-stream"]) == 0
    out = capsys.readouterr()
    assert "--dtype auto: bf16 (injected" in out.err and out.out.startswith("Hello")


def test_serve_dtype_auto_follows_the_choice(monkeypatch, tmp_path):
    """`btlm serve --dtype auto` (its default) loads the torch engine in the CPU's measured choice, as
    `btlm generate --dtype auto` does; an explicit dtype is kept."""
    from btlm.inference import save_model
    from btlm.serve.engine import TorchEngine
    from tests.conftest import make_model

    save_model(make_model(vocab_size=50257), tmp_path / "m")
    monkeypatch.setattr(precision, "choose_cpu_dtype",
                        lambda: PrecisionChoice(torch.bfloat16, "injected: native bf16 measured faster"))
    for dtype, want in (("auto", torch.bfloat16), ("fp32", torch.float32)):
        engine = TorchEngine.from_path(tmp_path / "m", dtype=dtype, device="cpu")
        try:
            assert engine.model.dtype == want, dtype
        finally:
            engine.close()
