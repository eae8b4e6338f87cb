"""``btlm quantize``: write a weight-only int4 / int8 copy of a BTLM checkpoint for CPU inference."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .packing import INT4_GROUP_SIZES, QuantizationError

_EPILOG = """\
examples:
  btlm quantize --model btlm-3b-8k-base --bits 4 --out btlm-3b-int4          # ~1.5 GB on disk
  btlm quantize --model demo_out/model --bits 8 --embedding keep --out demo-int8

The output loads with `import btlm; AutoModelForCausalLM.from_pretrained(OUT)` (or
`btlm.quant.load_quantized(OUT)`) and runs on CPU with PyTorch's int4/int8 weight-only kernels.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="btlm quantize",
        description="Weight-only quantisation of every transformer-block linear (Conv1D) of a BTLM checkpoint: "
        "int4 in groups along the input features (asymmetric, scale + zero per group) or int8 per output channel. "
        "Widths that are not a multiple of the group size (BTLM's FFN width 6826) are zero-padded, which is exact.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="BTLM model directory (config.json + safetensors or pytorch_model.bin)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--bits", type=int, default=4, help="weight bits: 4 (group-wise) or 8 (per channel); default 4")
    p.add_argument("--group-size", type=int, default=128,
                   help=f"int4 group size, one of {INT4_GROUP_SIZES} (default 128; ignored for --bits 8)")
    p.add_argument("--embedding", choices=["int8", "keep"], default="int8",
                   help="tied embedding / LM head: per-row int8 (default) or kept in --dtype")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="dtype of the unquantised parts (LayerNorms, biases, activations); fp32 (default) "
                        "is both more accurate and faster on CPUs without native bf16 matmuls")
    return p


def quantize_dir(model_dir, out_dir, bits: int = 4, group_size: int = 128, embedding_bits: int | None = 8,
                 dtype: str = "fp32") -> Path:
    """Load ``model_dir``, quantise it layer by layer and write it (+ tokenizer) to ``out_dir``."""
    import torch

    from btlm.inference import load_model, parse_dtype
    from btlm.tokenizer import load_tokenizer

    from . import save_quantized
    from .config import BTLMQuantConfig, read_unquantized_btlm_config
    from .quantize import cast_unquantized, quantize_model

    BTLMQuantConfig(bits=bits, group_size=group_size, embedding_bits=embedding_bits)  # validate before loading
    model_dir = Path(model_dir)
    read_unquantized_btlm_config(model_dir, quantized_hint="quantise from the unquantised model directory")
    model = load_model(model_dir)  # in the checkpoint's dtype: bf16 for the release, no fp32 copy of 3B
    with torch.no_grad():
        quantize_model(model, bits=bits, group_size=group_size, embedding_bits=embedding_bits)
        cast_unquantized(model, parse_dtype(dtype))
    try:
        tokenizer = load_tokenizer(str(model_dir))
    except Exception:  # no tokenizer files next to the weights: write the standard GPT-2 one
        tokenizer = load_tokenizer()
    return save_quantized(model, out_dir, tokenizer=tokenizer)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from btlm.inference import ModelLoadError

    try:
        out = quantize_dir(args.model, args.out, bits=args.bits, group_size=args.group_size,
                           embedding_bits=8 if args.embedding == "int8" else None, dtype=args.dtype)
    except (QuantizationError, ModelLoadError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
