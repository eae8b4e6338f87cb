"""The llama.cpp engine: a ``.gguf`` file from ``btlm export-gguf`` served through llama-cpp-python.

llama.cpp runs BTLM through its JAIS architecture (same block: SwiGLU, ALiBi, muP scales folded into the
weights by the exporter). One ``llama_cpp.Llama`` context serves one sequence at a time, so requests run one
after another in a worker thread (llama-cpp-python's own server does the same); its speed is llama.cpp's
single-stream CPU speed. Sampling is set to plain temperature / top-p (llama-cpp-python's defaults add
top-k 40, min-p 0.05 and a repeat penalty, which the OpenAI API does not have).
"""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path

from .engine import Chunk, Engine, EngineError, GenerationHandle, SamplingParams, TokenLogprob


class LlamaCppEngine(Engine):
    """Serves a GGUF file with ``llama_cpp.Llama`` (optional extra ``.[llama]``)."""

    name = "llama.cpp"
    supports_prompt_logprobs = False  # echo + logprobs would need every prompt position's logits

    def __init__(self, llm):
        self.llm = llm
        self.context_length = int(llm.n_ctx())
        self.eos_token_id = int(llm.token_eos())
        self.chat_template = None  # the exporter writes no chat template (BTLM is a base model)
        self._inbox: queue.Queue = queue.Queue()
        self._stats = {"completed": 0, "cancelled": 0, "running": 0}
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="btlm-serve-llama", daemon=True)
        self._thread.start()

    @classmethod
    def from_path(cls, path, n_ctx: int | None = None, n_threads: int | None = None) -> "LlamaCppEngine":
        try:
            import llama_cpp
        except ImportError:
            from btlm.errors import BTLMError

            raise BTLMError("the llama.cpp engine needs llama-cpp-python: pip install 'btlm[llama]'") from None
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist (write one with `btlm export-gguf`)")
        # n_ctx=0: the context length stored in the file; logits_all so logprobs can be returned
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx or 0, n_threads=n_threads or os.cpu_count(),
                              logits_all=True, verbose=False)
        return cls(llm)

    def encode(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def decode(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> GenerationHandle:
        self.check_prompt(prompt_ids, params)
        if params.prompt_logprobs:
            raise ValueError("echo with logprobs is not supported by the llama.cpp engine")
        handle = GenerationHandle()
        self._inbox.put((list(prompt_ids), params, handle))
        return handle

    def stats(self) -> dict:
        return dict(self._stats, waiting=self._inbox.qsize())

    def close(self) -> None:
        self._closing = True
        self._inbox.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            item = self._inbox.get()
            if item is None or self._closing:
                break
            prompt_ids, params, handle = item
            if handle.cancelled:
                self._stats["cancelled"] += 1
                continue
            self._stats["running"] = 1
            try:
                self._generate(prompt_ids, params, handle)
            except Exception as err:
                handle._put(EngineError(f"llama.cpp generation failed: {type(err).__name__}: {err}"))
            finally:
                self._stats["running"] = 0

    def _generate(self, prompt_ids: list[int], params: SamplingParams, handle: GenerationHandle) -> None:
        stream = self.llm.create_completion(
            prompt_ids, max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
            top_k=0, min_p=0.0, typical_p=1.0, repeat_penalty=1.0, stop=list(params.stop) or None,
            logprobs=params.logprobs, seed=params.seed, stream=True,
        )
        completion_tokens = 0
        try:
            for part in stream:
                if handle.cancelled:
                    self._stats["cancelled"] += 1
                    return
                choice = part["choices"][0]
                chunk = Chunk(text=choice.get("text") or "", finish_reason=choice.get("finish_reason"))
                lp = choice.get("logprobs")
                if lp:
                    for tok, tok_lp, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
                        chunk.logprobs.append(TokenLogprob(tok, -1, tok_lp, list((top or {}).items())))
                completion_tokens += max(1, len(chunk.logprobs)) if (chunk.text or chunk.logprobs) else 0
                if chunk.finish_reason is not None:
                    chunk.prompt_tokens, chunk.completion_tokens = len(prompt_ids), completion_tokens
                    self._stats["completed"] += 1
                handle._put(chunk)
        finally:
            stream.close()
