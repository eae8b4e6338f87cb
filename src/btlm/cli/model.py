"""``btlm init`` and ``btlm generate``."""

from __future__ import annotations

from btlm.cli.common import Parser, add_device, add_dtype, add_model, add_out, add_seed

#: ``btlm.model.PRESETS``' names, spelt out so that building the parser does not import torch (a test
#: checks that the two agree).
PRESET_NAMES = ("3b", "small", "tiny")


def build_parser(name: str) -> Parser:
    if name == "init":
        p = Parser(prog="btlm init", description=(
            "Write a randomly initialised BTLM model (muP init) and the GPT-2 tokenizer in the released HF\n"
            "layout, for offline use, tests and benchmarks."))
        p.add_argument("--preset", choices=PRESET_NAMES, default="tiny", help="model shape (3b = the released shape)")
        add_out(p)
        add_seed(p, help_="seed of the random initialisation")
        add_dtype(p, help_="storage dtype")
        return p
    p = Parser(prog="btlm generate", description=(
        "Generate text with a BTLM model. Output is streamed token by token (except with beam search)."))
    add_model(p, "model directory or hub id (e.g. cerebras/btlm-3b-8k-base)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="text to continue (not empty; or give --prompt-file, or pipe prompts on "
                        "standard input)")
    source.add_argument("--prompt-file", metavar="FILE", help="one prompt per line ('-' = standard input), "
                        "generated in batches; prints one JSON line {prompt, completion} per prompt")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch with --prompt-file / stdin")
    p.add_argument("--n-positions", type=int, default=None,
                   help="raise the position limit (generate past the trained length)")
    p.add_argument("--alibi-scaling", default=None,
                   help="position interpolation: dynamic (by K / trained length past it), dynamic:L, fixed:F or none")
    p.add_argument("--max-new-tokens", type=int, default=50, help="tokens to generate (>= 1)")
    p.add_argument("--num-beams", type=int, default=1, help="beam width (1 = greedy or sampling)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy / beam search")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0)")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling probability mass, in (0, 1]")
    p.add_argument("--no-repeat-ngram-size", type=int, default=0, help="forbid repeating n-grams of this size (0 = off)")
    add_dtype(p, choices=("fp32", "bf16", "fp16", "auto"),
              help_="compute dtype; auto: on CPU bf16 where this CPU has native bf16 and measures it faster, else "
                    "fp32; on GPU the checkpoint's (fp32 is the default because bf16 matmuls are slow on CPUs "
                    "without AVX512-BF16)")
    add_device(p)
    add_seed(p, help_="seed of the sampling")
    p.add_argument("--no-stream", action="store_true", help="print the whole text at the end instead of streaming")
    return p


def execute(name: str, args) -> int:
    if name == "init":
        from btlm.inference import init_model_dir

        out = init_model_dir(args.preset, args.out, seed=args.seed, dtype=args.dtype, overwrite=args.overwrite)
        print(f"wrote a random {args.preset} BTLM to {out}")
        return 0

    import json
    import sys

    from btlm.errors import UsageError
    from btlm.inference import (check_generation_args, context_overrides, generate_batch, generate_text,
                                load_model, read_prompts, resolve_tokenizer)
    from btlm.io import resolve_auto_dtype, resolve_device

    if args.prompt is None and args.prompt_file is None:
        if sys.stdin.isatty():
            raise UsageError("give --prompt, --prompt-file, or prompts on standard input")
        args.prompt_file = "-"
    if args.prompt is not None and not args.prompt:
        raise UsageError("--prompt is empty: give the text to continue, e.g. --prompt 'Hello'")
    prompts = read_prompts(args.prompt_file) if args.prompt_file is not None else None
    settings = dict(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, do_sample=args.do_sample,
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    no_repeat_ngram_size=args.no_repeat_ngram_size)
    check_generation_args(**settings)
    device = resolve_device(args.device, args.model)
    import torch

    torch.manual_seed(args.seed)
    dtype = resolve_auto_dtype(args.dtype, device, log=lambda m: print(m, file=sys.stderr))
    model = load_model(args.model, dtype=dtype, device=device,
                       **context_overrides(args.model, args.n_positions, args.alibi_scaling))
    tokenizer = resolve_tokenizer(args.model)
    if prompts is not None:
        for prompt, completion in zip(prompts, generate_batch(model, tokenizer, prompts, args.batch_size, **settings)):
            print(json.dumps({"prompt": prompt, "completion": completion}, ensure_ascii=False), flush=True)
        return 0
    stream = not args.no_stream and args.num_beams == 1
    text = generate_text(model, tokenizer, args.prompt, stream=stream, **settings)
    if not stream:
        print(text)
    return 0
