"""``btlm serve``: the command line over :func:`btlm.serve.load_engine` and :func:`btlm.serve.serve`."""

from __future__ import annotations

from btlm.cli.common import Parser, add_device, add_dtype


def build_parser(name: str) -> Parser:
    p = Parser(prog="btlm serve", description=(
        "Serve a BTLM model over the OpenAI HTTP API (/v1/completions, /v1/chat/completions, /v1/models,\n"
        "/health). The torch engine batches concurrent requests; the llama.cpp engine serves a GGUF file\n"
        "from `btlm export-gguf` (optional extra .[llama])."))
    p.add_argument("--model", required=True, metavar="PATH",
                   help="btlm model directory (fp32/bf16/int8/int4) or a .gguf file")
    p.add_argument("--engine", choices=["auto", "torch", "llama.cpp"], default="auto",
                   help="auto: llama.cpp for a .gguf file, torch otherwise")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--model-name", default=None, help="model id clients pass (default: the directory/file name)")
    add_dtype(p, default="auto", choices=("fp32", "bf16", "fp16", "auto"),
              help_="torch engine: compute dtype; auto: on CPU bf16 where this CPU has native bf16 and measures it "
                    "faster, else fp32; on GPU the checkpoint's")
    add_device(p)
    p.add_argument("--max-batch-size", type=int, default=32, help="torch engine: most sequences decoded together")
    p.add_argument("--n-ctx", type=int, default=None, help="llama.cpp engine: context length (default: the model's)")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp engine: CPU threads")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="server log level")
    return p


def execute(name: str, args) -> int:
    from btlm.cli.common import positive
    from btlm.serve import check_dependencies, default_model_name, load_engine, serve

    positive("max-batch-size", args.max_batch_size)
    check_dependencies()  # before loading a model for minutes
    engine = load_engine(args.model, engine=args.engine, dtype=args.dtype, device=args.device,
                         max_batch_size=args.max_batch_size, n_ctx=args.n_ctx, n_threads=args.threads)
    serve(engine, args.model_name or default_model_name(args.model), host=args.host, port=args.port,
          log_level=args.log_level)
    return 0
