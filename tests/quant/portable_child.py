"""Child process of tests/quant/test_portable.py, run under one ``ATEN_CPU_CAPABILITY`` each.

    python portable_child.py quantize FP_DIR OUT_ROOT        # README flow: btlm quantize, one dir per variant
    python portable_child.py run RESULT_PREFIX DIR [DIR …]   # load each dir: kernel + dense logits, alignment,
                                                             # and `btlm generate` on the first one

Prints one JSON line (capability and what it checked). Logits go to ``RESULT_PREFIX.safetensors``.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys

import torch

#: variant directory name → `btlm quantize` arguments
VARIANTS = {"int4-g128": ["--bits", "4", "--group-size", "128"],
            "int4-g32": ["--bits", "4", "--group-size", "32"],
            "int8": ["--bits", "8"]}


def quantize(fp_dir: str, out_root: str) -> dict:
    from btlm import cli

    for name, args in VARIANTS.items():
        with contextlib.redirect_stdout(io.StringIO()):
            rc = cli.main(["quantize", "--model", fp_dir, *args, "--out", f"{out_root}/{name}"])
        if rc != 0:
            raise SystemExit(f"btlm quantize {args} exited {rc}")
    return {}


def run(prefix: str, dirs: list[str]) -> dict:
    from safetensors.torch import save_file

    from btlm import cli
    from btlm.quant import kernels, load_quantized, modules

    calls = {"int4": 0, "int8": 0}
    misaligned: list[str] = []

    def recording(kind, op):
        def wrapped(*args):
            calls[kind] += 1
            misaligned.extend(f"{kind} arg {i} at {a.data_ptr() % 64} mod 64" for i, a in enumerate(args)
                              if isinstance(a, torch.Tensor) and a.data_ptr() % kernels.ALIGNMENT)
            return op(*args)
        return wrapped

    kernels._int4_mm_op = recording("int4", kernels._int4_mm_op)
    kernels._int8_mm_op = recording("int8", kernels._int8_mm_op)
    ids = torch.randint(0, 50000, (2, 12), generator=torch.Generator().manual_seed(0))
    out = {}
    for d in dirs:
        model = load_quantized(d)
        with torch.no_grad():
            out[f"{d}|kernel"] = model(ids).logits.contiguous()
            # the same weights without the kernels: dequantise + dense matmul (the reference)
            saved, kernels._available = dict(kernels._available), {"int4": False, "int8": False}
            modules.DEQUANT_MIN_ROWS, dense_rows = 0, modules.DEQUANT_MIN_ROWS
            out[f"{d}|dense"] = model(ids).logits.contiguous()
            kernels._available, modules.DEQUANT_MIN_ROWS = saved, dense_rows
    save_file(out, f"{prefix}.safetensors")
    with contextlib.redirect_stdout(io.StringIO()) as text:
        rc = cli.main(["generate", "--model", dirs[0], "--prompt", "Hello", "--max-new-tokens", "4",
                             "--no-stream"])
    return dict(calls=calls, misaligned=misaligned[:10], generate_rc=rc, generated=text.getvalue(),
                kernels=dict(kernels._available))


def main() -> None:
    mode, *args = sys.argv[1:]
    result = quantize(*args) if mode == "quantize" else run(args[0], args[1:])
    from btlm.quant.kernels import cpu_capability

    print(json.dumps(dict(result, capability=cpu_capability())))


if __name__ == "__main__":
    main()
