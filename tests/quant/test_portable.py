"""Quantised files are portable between CPUs: the bytes do not depend on the CPU that wrote them, a file
from one CPU capability runs under every other, every kernel operand is 64-byte aligned, a CPU without a
kernel falls back instead of crashing, and files of the old (CPU-specific) format are refused clearly.

PyTorch picks its kernels by ``ATEN_CPU_CAPABILITY`` (``default`` < ``avx2`` < ``avx512``; a process can only
go down from what the CPU has), so the cross-capability test runs child processes under each capability
this machine supports.
"""

import copy
import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import btlm  # noqa: F401  (registers the model classes)
from btlm.quant import QuantizationError, kernels, load_quantized, modules, quantize_model, register, save_quantized
from tests.conftest import make_model

register()
CHILD = Path(__file__).with_name("portable_child.py")


def supported_capabilities() -> list[str]:
    """``ATEN_CPU_CAPABILITY`` values this machine can run, lowest first (asked of a fresh process)."""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    native = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                            env=env, capture_output=True, text=True, check=True).stdout.strip().lower()
    ladder = ["default", "avx2", "avx512"]
    return ladder[: ladder.index(native) + 1] if native in ladder else ["default", native]


def _children(jobs: dict[str, list]) -> dict[str, dict]:
    """Run ``portable_child.py`` once per capability (``{capability: args}``), all at once (one thread each)."""
    procs = {cap: subprocess.Popen([sys.executable, str(CHILD), *map(str, args)], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True,
                                   env=dict(os.environ, ATEN_CPU_CAPABILITY=cap, OMP_NUM_THREADS="1"))
             for cap, args in jobs.items()}
    results = {}
    for cap, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"child under {cap} failed (exit {proc.returncode}):\n{stderr[-3000:]}"
        results[cap] = json.loads(stdout.strip().splitlines()[-1])
        assert results[cap]["capability"].lower() == cap, results[cap]  # it really ran the capability asked for
    return results


def _digest(directory: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(directory.iterdir())
            if f.suffix in (".safetensors", ".json")}


@pytest.mark.skipif("ATEN_CPU_CAPABILITY" in os.environ,
                    reason="runs every capability itself in child processes (once is enough)")
def test_files_are_identical_and_portable_across_cpu_capabilities(tmp_path):
    from btlm.inference import save_model

    caps = supported_capabilities()
    fp_dir = save_model(make_model(vocab_size=50257), tmp_path / "fp")  # GPT-2 vocabulary: `btlm generate` works
    _children({cap: ["quantize", fp_dir, tmp_path / cap] for cap in caps})  # the README flow, per capability
    written = {cap: {v: tmp_path / cap / v for v in ("int4-g128", "int4-g32", "int8")} for cap in caps}

    # 1. the stored bytes do not depend on the CPU capability that quantised them
    for variant in ("int4-g128", "int4-g32", "int8"):
        digests = {cap: _digest(written[cap][variant]) for cap in caps}
        assert len(set(map(json.dumps, digests.values()))) == 1, f"{variant}: bytes differ by capability: {digests}"
    config = json.loads((written[caps[0]]["int4-g128"] / "config.json").read_text())
    assert config["quantization_config"]["format_version"] == 2

    # 2. a file written under each capability loads and computes the same logits under every capability
    dirs = [written[w][v] for v in ("int4-g128", "int4-g32", "int8") for w in caps]
    runs = _children({cap: ["run", tmp_path / f"logits-{cap}", *dirs] for cap in caps})
    logits = {}
    for cap, out in runs.items():
        assert out["generate_rc"] == 0 and out["generated"].startswith("Hello"), out  # README quickstart runs
        # 3. every operand handed to a kernel was 64-byte aligned, and the kernels really ran
        assert out["kernels"] == {"int4": True, "int8": True}, out
        assert out["calls"]["int4"] > 0 and out["calls"]["int8"] > 0 and out["misaligned"] == [], out
        logits[cap] = load_file(tmp_path / f"logits-{cap}.safetensors")
    for cap in caps:
        for d in dirs:
            kernel, dense = logits[cap][f"{d}|kernel"], logits[cap][f"{d}|dense"]
            scale = dense.abs().max().item()
            # the kernel computes the stored weights: within its bf16-activation rounding of the dense route
            assert torch.allclose(kernel, dense, atol=0.03 * scale), (cap, d, (kernel - dense).abs().max())
            assert not torch.equal(kernel, dense)  # both routes really ran
            # and what it computes does not depend on where the file was written or which kernel runs it
            ref = logits[caps[0]][f"{written[caps[0]][Path(d).name]}|dense"]
            assert torch.allclose(dense, ref, atol=1e-5), (cap, d)
            assert torch.allclose(kernel, logits[caps[0]][f"{d}|kernel"], atol=0.03 * scale), (cap, d)


@pytest.fixture
def simulated_cpu():
    """Restore the real kernels and forget probe results after a test that replaced them."""
    ops = (kernels._int4_pack_op, kernels._int4_mm_op, kernels._int8_mm_op)
    kernels.reset()
    yield
    kernels._int4_pack_op, kernels._int4_mm_op, kernels._int8_mm_op = ops
    kernels.reset()


def _no_kernel(*args):
    raise NotImplementedError("Could not run '_weight_int4pack_mm_for_cpu' with arguments from the 'CPU' backend")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(1)
    return make_model(vocab_size=300), torch.randint(0, 300, (2, 24))


@pytest.mark.parametrize("missing", ["int4", "int8"])
def test_missing_kernel_falls_back_with_one_warning(tiny, simulated_cpu, monkeypatch, caplog, missing):
    model, ids = tiny
    q = quantize_model(copy.deepcopy(model), bits=4 if missing == "int4" else 8, group_size=32, progress=False)
    with torch.no_grad():
        monkeypatch.setattr(modules, "DEQUANT_MIN_ROWS", 0)  # every layer dequantises: the reference
        kernels._available.update(int4=False, int8=False)
        dense = q(ids).logits
        monkeypatch.undo()
        kernels.reset()
        setattr(kernels, f"_{missing}_mm_op", _no_kernel)  # this CPU has no such kernel
        with caplog.at_level(logging.WARNING, logger="btlm.quant"):
            out = q(ids).logits
            q(ids)
    warnings = [r.getMessage() for r in caplog.records if r.name == "btlm.quant"]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings  # one line, once
    assert f"{missing} weight-only kernel is not usable" in warnings[0] and "Could not run" in warnings[0]
    other = "int8" if missing == "int4" else "int4"
    if not kernels._available.get(other, False):  # the int4 model's LM head is int8 (the kernel still used)
        assert torch.equal(out, dense)
    else:
        assert torch.allclose(out, dense, atol=0.03 * dense.abs().max().item())
    assert kernels._available[missing] is False


def test_kernel_computing_garbage_is_not_used(tiny, simulated_cpu, caplog):
    """A kernel that runs but computes something else (e.g. a layout mismatch) is caught by the probe."""
    model, ids = tiny
    real = kernels._int4_pack_op
    kernels._int4_pack_op = lambda codes: real(15 - codes)  # a wrong layout
    q = quantize_model(copy.deepcopy(model), bits=4, group_size=32, embedding_bits=None, progress=False)
    with caplog.at_level(logging.WARNING, logger="btlm.quant"), torch.no_grad():
        out = q(ids).logits
    assert kernels._available["int4"] is False and "wrong result" in caplog.text
    kernels._int4_pack_op = real
    kernels.reset()
    with torch.no_grad():
        good = quantize_model(copy.deepcopy(model), bits=4, group_size=32, embedding_bits=None, progress=False)(ids).logits
    assert torch.allclose(out, good, atol=0.03 * good.abs().max().item())


def test_loaded_kernel_operands_are_aligned_though_the_file_is_not(tiny, tmp_path, simulated_cpu):
    """Tensors viewed straight from the memory-mapped file sit at whatever offset the file gives them; the
    loader hands the kernels aligned copies (the AVX-512 int8 kernel faults otherwise)."""
    model, ids = tiny
    for bits in (4, 8):
        save_quantized(quantize_model(copy.deepcopy(model), bits=bits, group_size=32, progress=False), tmp_path / f"q{bits}")
    with safe_open(tmp_path / "q8" / "model.safetensors", "pt") as f:  # the mmap views from_pretrained gets
        offsets = {k: f.get_tensor(k).data_ptr() % 64 for k in f.keys() if k.endswith("weight_int8")}
    assert any(offsets.values()), offsets  # the file really holds misaligned tensors
    seen = []
    real4, real8 = kernels._int4_mm_op, kernels._int8_mm_op

    def record(op):
        def wrapped(*args):
            seen.extend(a.data_ptr() % 64 for a in args if isinstance(a, torch.Tensor))
            return op(*args)
        return wrapped

    kernels._int4_mm_op, kernels._int8_mm_op = record(real4), record(real8)
    for bits in (4, 8):
        with torch.no_grad():
            load_quantized(tmp_path / f"q{bits}")(ids[:, :5])
    assert len(seen) > 20 and set(seen) == {0}


def test_old_format_int4_is_refused_in_one_line_and_int8_still_loads(tiny, tmp_path):
    model, ids = tiny
    for bits in (4, 8):
        save_quantized(quantize_model(copy.deepcopy(model), bits=bits, group_size=32, progress=False), tmp_path / f"q{bits}")
        config_file = tmp_path / f"q{bits}" / "config.json"
        config = json.loads(config_file.read_text())
        config["quantization_config"]["format_version"] = 1
        config_file.write_text(json.dumps(config))
    with pytest.raises(QuantizationError) as err:
        load_quantized(tmp_path / "q4")
    assert "re-run `btlm quantize`" in str(err.value) and "\n" not in str(err.value)
    from btlm.cli import main

    assert main(["generate", "--model", str(tmp_path / "q4"), "--prompt", "x"]) == 1  # one error line, no crash
    q8 = load_quantized(tmp_path / "q8")  # int8's layout never changed: version-1 int8 files keep working
    assert q8(ids).logits.shape == (2, 24, 300)
    config_file = tmp_path / "q8" / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"]["format_version"] = 3
    config_file.write_text(json.dumps(config))
    with pytest.raises(QuantizationError, match="format_version 3 is not supported"):
        load_quantized(tmp_path / "q8")
