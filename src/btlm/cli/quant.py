"""``btlm quantize``, ``btlm quality`` and ``btlm export-gguf``."""

from __future__ import annotations

from btlm.cli.common import Parser, add_dtype, add_model, add_out, add_progress, progress_enabled

#: ``btlm.quant.packing.INT4_GROUP_SIZES`` and ``btlm.quant.gguf.OUTTYPES``, spelt out so that building the
#: parsers does not import torch (a test checks that they agree).
INT4_GROUP_SIZES = (32, 64, 128, 256)
GGUF_OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")

QUANTIZE_EPILOG = """\
examples:
  btlm quantize --model btlm-3b-8k-base --bits 4 --out btlm-3b-int4          # ~1.5 GB on disk
  btlm quantize --model demo_out/model --bits 8 --embedding keep --out demo-int8

The output loads with `import btlm; AutoModelForCausalLM.from_pretrained(OUT)` (or
`btlm.quant.load_quantized(OUT)`) and runs on CPU with PyTorch's int4/int8 weight-only kernels.
"""

GGUF_EPILOG = """\
examples:
  btlm export-gguf --model btlm-3b-8k-base --out btlm-3b-f16.gguf
  btlm export-gguf --model btlm-3b-8k-base --out btlm-3b-q4_0.gguf --outtype q4_0
  llama-cli -m btlm-3b-q4_0.gguf -p "The capital of France is" -n 40 --temp 0

llama.cpp runs the file through its JAIS architecture (same network as BTLM). The f16 file can also be
re-quantised with llama.cpp's `llama-quantize` (e.g. Q4_K_M): the FFN is padded to a multiple of 256.
"""


def build_parser(name: str) -> Parser:
    if name == "quantize":
        p = Parser(prog="btlm quantize", epilog=QUANTIZE_EPILOG, description=(
            "Weight-only quantisation of every transformer-block linear (Conv1D) of a BTLM checkpoint: int4 in\n"
            "groups along the input features (asymmetric, scale + zero per group) or int8 per output channel.\n"
            "Widths that are not a multiple of the group size (BTLM's FFN width 6826) are zero-padded, which is exact."))
        add_model(p, "unquantised BTLM model directory (config.json + safetensors or pytorch_model.bin)")
        add_out(p)
        p.add_argument("--bits", type=int, default=4, choices=(4, 8), help="weight bits: 4 (group-wise) or 8 (per channel)")
        p.add_argument("--group-size", type=int, default=128, choices=INT4_GROUP_SIZES,
                       help="int4 group size (ignored for --bits 8)")
        p.add_argument("--embedding", choices=["int8", "keep"], default="int8",
                       help="tied embedding / LM head: per-row int8, or kept in --dtype")
        add_dtype(p, choices=("fp32", "bf16"), help_="dtype of the unquantised parts (LayerNorms, biases, "
                  "activations); fp32 is both more accurate and faster on CPUs without native bf16 matmuls")
        add_progress(p)
        return p
    if name == "quality":
        p = Parser(prog="btlm quality", description=(
            "How much quantisation changes a model: quantise it in memory to int8 and int4 (group sizes 128, 64,\n"
            "32) and print KL(fp32 || quantised) per token and both perplexities on held-out text as a Markdown table."))
        p.add_argument("--model", metavar="DIR", help="unquantised BTLM directory (loaded in fp32)")
        p.add_argument("--text", metavar="FILE", help="held-out UTF-8 text file (not seen in training)")
        p.add_argument("--tiny-trained", action="store_true",
                       help="instead: train the tiny byte-level model of tests/quant/test_quality.py and use it")
        p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
        p.add_argument("--batch-size", type=int, default=4, help="sequences per batch")
        p.add_argument("--max-batches", type=int, default=8, help="batches at most")
        return p
    p = Parser(prog="btlm export-gguf", epilog=GGUF_EPILOG, description=(
        "Write a BTLM checkpoint as a GGUF file that llama.cpp loads through its JAIS architecture\n"
        "(muP multipliers folded into the embedding and output matrices, FFN zero-padded for quantisation)."))
    add_model(p, "unquantised BTLM model directory (config.json + weights)")
    add_out(p, kind="file", help_="output .gguf file (must be new unless --overwrite; written atomically)")
    p.add_argument("--outtype", default="f16", type=str.lower, choices=GGUF_OUTTYPES,
                   help="matrix type; norms and biases are always f32; q4_0 keeps the embedding and output matrices q8_0")
    p.add_argument("--pad-ffn-to", type=int, default=256,
                   help="zero-pad the FFN width to a multiple of this (6826 -> 6912 for 256); 1 disables")
    add_progress(p)
    return p


def execute(name: str, args) -> int:
    from btlm.errors import UsageError

    if name == "quantize":
        from btlm.quant.quantize import quantize_dir

        out = quantize_dir(args.model, args.out, bits=args.bits, group_size=args.group_size,
                           embedding_bits=8 if args.embedding == "int8" else None, dtype=args.dtype,
                           overwrite=args.overwrite, progress=progress_enabled(args.progress))
        print(f"wrote {out}")
        return 0
    if name == "quality":
        from btlm.quant.quality import load_text_batches, markdown_rows, quality_table, train_tiny_byte_model

        for key in ("seq_len", "batch_size", "max_batches"):
            if getattr(args, key) < 1:
                raise UsageError(f"--{key.replace('_', '-')} {getattr(args, key)}: expected an integer >= 1")
        if args.tiny_trained:
            model, batches = train_tiny_byte_model()
        elif not (args.model and args.text):
            raise UsageError("btlm quality: give --model and --text, or --tiny-trained")
        else:
            model, batches = load_text_batches(args.model, args.text, args.seq_len, args.batch_size, args.max_batches)
        print(markdown_rows(quality_table(model, batches)))
        return 0
    import logging

    from btlm.quant.gguf import export_gguf

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    out = export_gguf(args.model, args.out, outtype=args.outtype, pad_ffn_to=args.pad_ffn_to,
                      progress=progress_enabled(args.progress), overwrite=args.overwrite)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.outtype}, architecture jais)")
    return 0
