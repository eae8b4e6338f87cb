"""What a serving engine does, and the torch engine: continuous batching over one padded KV cache.

An engine takes token ids and :class:`SamplingParams` and returns a :class:`GenerationHandle` that yields
:class:`Chunk` s (text deltas, optional log-probabilities, a finish reason on the last one). The HTTP layer
(:mod:`btlm.serve.app`) knows nothing about tensors; the engines know nothing about HTTP.

:class:`TorchEngine` runs every request in one background thread that owns the model. Each step it

1. drops sequences whose client has gone (``handle.cancel()``),
2. prefills the requests that arrived since the last step (one left-padded forward) and samples their
   first token,
3. appends them to the running batch (its KV cache is left-padded to a common length),
4. runs one decode forward for the whole batch and samples one token per sequence,
5. removes the sequences that finished (stop sequence, end-of-text token, ``max_tokens``) and trims
   the cache columns that only padding still uses.

So a request that arrives while others decode joins them at the next step, and one that finishes leaves at
once. Left padding is exact for BTLM: the ALiBi bias depends only on the distance between query and key,
which padding does not change, and padded keys get zero attention weight. (Learned absolute positions
get explicit ``position_ids``.) The one exception is *dynamic* ALiBi interpolation (``alibi_scaling`` with
``train_seq_len``), whose divisor is computed from the padded key length, as in the original model with
a padded batch: past the trained length a batched sequence can differ from the same sequence alone.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import queue
import random
import threading
import time
from dataclasses import dataclass, field

import torch

from .text import IncrementalDecoder, StopMatcher

log = logging.getLogger("btlm.serve")


@dataclass(frozen=True)
class SamplingParams:
    """How to continue one prompt (the OpenAI request fields, already validated)."""

    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: no log-probabilities; k: the chosen token's and the k most likely
    prompt_logprobs: bool = False  # also the log-probabilities of the prompt tokens (completions' echo)


@dataclass
class TokenLogprob:
    """One token's log-probability under the model (before temperature / top-p) and its top alternatives."""

    token: str
    token_id: int
    logprob: float | None  # None for the first prompt token: nothing predicts it
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Chunk:
    """A piece of one sequence's output. The last chunk has ``finish_reason`` and the token counts."""

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0


class EngineError(RuntimeError):
    """The engine failed while generating (the message says why); the server answers 500 and goes on."""


class GenerationHandle:
    """The output of one submitted sequence: iterate it (``async for`` or ``for``) to get its chunks.

    Chunks are put by the engine thread and read by the server's event loop (or a plain thread when the
    handle was created outside a running loop). ``cancel()`` makes the engine drop the sequence at its
    next step; the iteration then ends without a final chunk.
    """

    def __init__(self):
        try:
            self._loop = asyncio.get_running_loop()
            self._queue = asyncio.Queue()
        except RuntimeError:
            self._loop = None
            self._queue = queue.Queue()
        self.cancelled = False
        self.done = False

    def cancel(self) -> None:
        self.cancelled = True
        self._put(None)  # wake a reader waiting on this handle

    # called by the engine thread
    def _put(self, item) -> None:
        if self._loop is None:
            self._queue.put(item)
        else:
            try:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
            except RuntimeError:  # the loop has closed: nobody is listening any more
                self.cancelled = True

    def _next(self, item):
        if item is None or isinstance(item, BaseException):
            self.done = True
            if isinstance(item, BaseException):
                raise item
            raise StopIteration
        if item.finish_reason is not None:
            self.done = True
        return item

    def __aiter__(self):
        return self

    async def __anext__(self) -> Chunk:
        if self.done:
            raise StopAsyncIteration
        try:
            return self._next(await self._queue.get())
        except StopIteration:
            raise StopAsyncIteration from None

    def __iter__(self):
        return self

    def __next__(self) -> Chunk:
        if self.done:
            raise StopIteration
        return self._next(self._queue.get())


class Engine:
    """The interface :mod:`btlm.serve.app` uses. Subclasses set the attributes and implement the methods."""

    name: str = "engine"
    context_length: int  # the longest prompt + completion, in tokens
    chat_template: str | None = None  # the tokenizer's chat template, if it has one
    supports_prompt_logprobs: bool = True

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def apply_chat_template(self, messages: list[dict]) -> str:
        raise NotImplementedError

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> GenerationHandle:
        raise NotImplementedError

    def stats(self) -> dict:
        return {}

    def close(self) -> None:
        pass

    def check_prompt(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """``ValueError`` (a 400 for that request) for an empty prompt or one that does not fit the context
        with its ``max_tokens``; every engine checks this before queueing a request."""
        if not prompt_ids:
            raise ValueError("the prompt has no tokens")
        if len(prompt_ids) + params.max_tokens > self.context_length:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) is longer than "
                             f"the context ({self.context_length} tokens)")


# --------------------------------------------------------------------------------------------------
# The torch engine
# --------------------------------------------------------------------------------------------------


class _Sequence:
    """A request inside the torch engine: its ids, sampler state, text state and output handle."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, handle: GenerationHandle, tokenizer, device):
        self.prompt_ids = prompt_ids
        self.params = params
        self.handle = handle
        self.generated: list[int] = []
        self.decoder = IncrementalDecoder(tokenizer)
        self.stopper = StopMatcher(params.stop)
        self.prompt_logprobs: list[TokenLogprob] | None = None  # sent with the first chunk
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator(device=device)
            seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**63)
            self.generator.manual_seed(seed)

    @property
    def length(self) -> int:
        """Tokens in the KV cache once the last sampled token has been fed."""
        return len(self.prompt_ids) + len(self.generated)


def _left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    pad = length - t.shape[dim]
    if pad <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = pad
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class TorchEngine(Engine):
    """Continuous batching over a BTLM ``transformers`` model (any btlm model directory: fp32, bf16, int8, int4).

    Args:
        model: a loaded ``BTLMLMHeadModel`` (eval mode) on its device.
        tokenizer: its tokenizer.
        max_batch_size: the most sequences decoded together; further requests wait for a free slot.
        name: the model id clients pass as ``model``.
    """

    name = "torch"

    def __init__(self, model, tokenizer, max_batch_size: int = 32):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self._decode_tokenizer = copy.deepcopy(tokenizer)  # the engine thread's own (Rust tokenizers are not re-entrant)
        self.device = next(model.parameters()).device
        self.context_length = int(model.config.n_positions)
        self.eos_token_id = tokenizer.eos_token_id
        self.chat_template = getattr(tokenizer, "chat_template", None)
        self.max_batch_size = max_batch_size
        self._learned_positions = getattr(model.transformer, "wpe", None) is not None
        self._inbox: queue.Queue = queue.Queue()
        self._rows: list[_Sequence] = []  # the running batch, in KV-cache row order
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer [B, H, K, d]
        self._mask: torch.Tensor | None = None  # [B, K], 1 = real token, 0 = left padding
        self._stats = {"steps": 0, "peak_batch": 0, "generated_tokens": 0, "cancelled": 0}
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="btlm-serve-torch", daemon=True)
        self._thread.start()

    @classmethod
    def from_path(cls, path, dtype=None, device: str | None = None, max_batch_size: int = 32) -> "TorchEngine":
        """Load a btlm model directory (quantised ones included) with its tokenizer."""
        from pathlib import Path

        from btlm.inference import load_model
        from btlm.io import resolve_auto_dtype, resolve_device
        from btlm.tokenizer import load_tokenizer

        device = resolve_device(device, path)
        dtype = resolve_auto_dtype(dtype, device, log=log.info)
        model = load_model(path, dtype=dtype, device=device)
        tokenizer = load_tokenizer(path) if Path(path, "tokenizer_config.json").is_file() else load_tokenizer()
        return cls(model, tokenizer, max_batch_size=max_batch_size)

    # ---------------------------------------------------------------------------- the Engine interface

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def apply_chat_template(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> GenerationHandle:
        self.check_prompt(prompt_ids, params)
        vocab = self.model.config.vocab_size
        bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:  # checked here: in the batch it would fail every sequence's forward
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab})")
        if self._closing:
            raise EngineError("the engine is shut down")
        handle = GenerationHandle()
        self._inbox.put(_Sequence(list(prompt_ids), params, handle, self._decode_tokenizer, self.device))
        return handle

    def stats(self) -> dict:
        return dict(self._stats, running=len(self._rows), waiting=self._inbox.qsize(), max_batch_size=self.max_batch_size)

    def close(self) -> None:
        self._closing = True
        self._inbox.put(None)
        self._thread.join(timeout=30)

    # ---------------------------------------------------------------------------- the scheduler thread

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._closing:
            arrivals = self._take_arrivals()
            if self._closing:
                break
            try:
                with torch.inference_mode():
                    if arrivals:
                        self._admit(arrivals)
                    if self._rows:
                        self._decode_step()
            except Exception as err:  # a failed forward ends the sequences in it, not the server
                log.exception("generation step failed")
                failed = self._rows + [s for s in arrivals if s not in self._rows]
                self._rows, self._cache, self._mask = [], None, None
                for seq in failed:
                    seq.handle._put(EngineError(f"generation failed: {type(err).__name__}: {err}"))
        for seq in self._rows:
            seq.handle._put(EngineError("the server is shutting down"))

    def _take_arrivals(self) -> list[_Sequence]:
        """New sequences for this step: block while idle, else take what is queued, up to the free slots."""
        arrivals: list[_Sequence] = []
        block = not self._rows
        while len(self._rows) + len(arrivals) < self.max_batch_size:
            try:
                item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                if block and not self._closing:
                    continue
                break
            if item is None:
                self._closing = True
                break
            block = False
            if item.handle.cancelled:
                self._stats["cancelled"] += 1
                continue
            arrivals.append(item)
        return arrivals

    def _forward(self, input_ids, mask, cache, positions):
        from transformers.cache_utils import DynamicCache

        past = DynamicCache(ddp_cache_data=cache, config=self.model.config) if cache else DynamicCache(config=self.model.config)
        out = self.model.transformer(input_ids=input_ids, attention_mask=mask, past_key_values=past, use_cache=True,
                                     position_ids=positions if self._learned_positions else None)
        new_cache = [(layer.keys, layer.values) for layer in past.layers]
        return out.last_hidden_state, new_cache

    def _admit(self, seqs: list[_Sequence]) -> None:
        """Prefill the new sequences together (left-padded), sample their first token, join the batch."""
        length = max(len(s.prompt_ids) for s in seqs)
        ids = torch.full((len(seqs), length), self.eos_token_id or 0, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, length - len(s.prompt_ids):] = torch.tensor(s.prompt_ids)
            mask[i, length - len(s.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden, cache = self._forward(ids, mask, None, positions)
        logits = self.model.logits_from_hidden(hidden[:, -1]).float()
        for i, s in enumerate(seqs):
            if s.params.prompt_logprobs:
                s.prompt_logprobs = self._prompt_logprobs(s, hidden[i, length - len(s.prompt_ids):])
        self._join(seqs, cache, mask)
        self._sample_and_emit(seqs, logits)

    def _prompt_logprobs(self, seq: _Sequence, hidden: torch.Tensor) -> list[TokenLogprob]:
        """Log-probability of each prompt token given the ones before it (None for the first)."""
        out = [TokenLogprob(self._token_text(seq.prompt_ids[0]), seq.prompt_ids[0], None)]
        k = seq.params.logprobs or 0
        for c0 in range(0, len(seq.prompt_ids) - 1, 256):  # logits in chunks: [256, vocab] at a time
            c1 = min(len(seq.prompt_ids) - 1, c0 + 256)
            logprobs = torch.log_softmax(self.model.logits_from_hidden(hidden[c0:c1]).float(), dim=-1)
            for j in range(c1 - c0):
                out.append(self._logprob_entry(logprobs[j], seq.prompt_ids[c0 + j + 1], k))
        return out

    def _join(self, seqs: list[_Sequence], cache, mask: torch.Tensor) -> None:
        if self._cache is None:
            self._rows, self._cache, self._mask = list(seqs), cache, mask
            return
        length = max(self._mask.shape[1], mask.shape[1])
        self._cache = [
            (torch.cat([_left_pad(k0, length, 2), _left_pad(k1, length, 2)]),
             torch.cat([_left_pad(v0, length, 2), _left_pad(v1, length, 2)]))
            for (k0, v0), (k1, v1) in zip(self._cache, cache)
        ]
        self._mask = torch.cat([_left_pad(self._mask, length, 1), _left_pad(mask, length, 1)])
        self._rows += seqs

    def _decode_step(self) -> None:
        """Feed every sequence's last token; sample the next one."""
        ids = torch.tensor([[s.generated[-1]] for s in self._rows], device=self.device)
        positions = self._mask.sum(-1, keepdim=True)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(self._rows), 1))], dim=1)
        hidden, self._cache = self._forward(ids, self._mask, self._cache, positions)
        logits = self.model.logits_from_hidden(hidden[:, -1]).float()
        self._stats["steps"] += 1
        self._stats["peak_batch"] = max(self._stats["peak_batch"], len(self._rows))
        self._sample_and_emit(list(self._rows), logits)

    def _sample_and_emit(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        """Sample one token per sequence (row i of ``logits`` is ``seqs[i]``), send it, retire the finished."""
        greedy = logits.argmax(-1).tolist()
        finished = []
        for i, s in enumerate(seqs):
            if s.handle.cancelled:
                finished.append(s)
                self._stats["cancelled"] += 1
                continue
            token = greedy[i] if s.generator is None else self._sample(logits[i], s)
            s.generated.append(token)
            self._stats["generated_tokens"] += 1
            chunk = Chunk(prompt_logprobs=s.prompt_logprobs)
            s.prompt_logprobs = None
            if s.params.logprobs is not None:
                chunk.logprobs.append(self._logprob_entry(torch.log_softmax(logits[i], -1), token, s.params.logprobs))
            if token == self.eos_token_id:
                chunk.text, chunk.finish_reason = s.decoder.flush() + s.stopper.flush(), "stop"
            else:
                chunk.text, stopped = s.stopper.feed(s.decoder.push(token))
                if stopped:
                    chunk.finish_reason = "stop"
                elif len(s.generated) >= s.params.max_tokens:
                    text, stopped = s.stopper.feed(s.decoder.flush())
                    chunk.text += text if stopped else text + s.stopper.flush()
                    chunk.finish_reason = "stop" if stopped else "length"
            if chunk.finish_reason is not None:
                chunk.prompt_tokens, chunk.completion_tokens = len(s.prompt_ids), len(s.generated)
                finished.append(s)
            if chunk.text or chunk.logprobs or chunk.prompt_logprobs or chunk.finish_reason:
                s.handle._put(chunk)
        if finished:
            self._retire(finished)

    def _sample(self, logits: torch.Tensor, seq: _Sequence) -> int:
        """Temperature, then nucleus (top-p) filtering, then one draw from the sequence's own generator."""
        probs = torch.softmax(logits / seq.params.temperature, dim=-1)
        if seq.params.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (at least the most likely token)
            drop = sorted_probs.cumsum(-1) - sorted_probs >= seq.params.top_p
            drop[0] = False
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=seq.generator))

    def _logprob_entry(self, logprobs: torch.Tensor, token: int, k: int) -> TokenLogprob:
        top = []
        if k:
            values, indices = logprobs.topk(k)
            top = [(self._token_text(int(t)), float(v)) for v, t in zip(values, indices)]
        return TokenLogprob(self._token_text(token), token, float(logprobs[token]), top)

    def _token_text(self, token: int) -> str:
        return self._decode_tokenizer.decode([token])

    def _retire(self, finished: list[_Sequence]) -> None:
        """Remove finished rows from the batch and drop cache columns that are padding in every row left."""
        keep = [i for i, s in enumerate(self._rows) if s not in finished]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        index = torch.tensor(keep, device=self.device)
        mask = self._mask.index_select(0, index)
        start = int(mask.any(0).long().argmax())  # first column some remaining row uses
        self._mask = mask[:, start:]
        self._cache = [(k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:]) for k, v in self._cache]
        self._rows = [self._rows[i] for i in keep]


def wait_idle(engine: TorchEngine, timeout: float = 10.0) -> bool:
    """Wait until the engine has no running or waiting sequence (for tests and benchmarks)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.stats()
        if not stats["running"] and not stats["waiting"]:
            return True
        time.sleep(0.02)
    return False
