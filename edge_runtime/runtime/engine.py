"""The engine: the one resident base model and its context. The only module of the runtime that imports llama_cpp
(the converters use it too: ggml's quantiser, a base model's vocabulary).

Every llama.cpp call runs on the engine's single worker thread; public methods may be called from any thread and
hand their work to it. Keep it so when embedding an engine: llama.cpp's OpenMP keeps a thread team per thread that
ran a graph, and with more OpenMP threads than cores its barriers sleep instead of spinning (decode halved). The
profile's thread count is the most the engine uses: with a quantised KV cache (llama.cpp's results then do not
depend on the thread count) the governor sheds threads while the device is busy (``governor.py``); with an f16 cache
the count is fixed for the engine's life (flash attention's split-KV decode rounds by thread count).
The base model is memory-mapped once (adapters go through ``llama_adapter_lora_init`` / ``llama_set_adapters_lora``
/ ``llama_adapter_lora_free``: ``Llama(lora_path=...)`` would turn mmap off).

KV isolation: llama.cpp leaves cache consistency to the caller (``llama_set_adapters_lora`` never touches the KV
cache, and llama-cpp-python reuses prompt prefixes by tokens alone). The engine records which adapter set computed
each cached position — each adapter's content digest and scale, never its name — and reuses a prefix only where
both the tokens and that set agree (``activation.py``); an aLoRA's prompt is evaluated in segments, the part
before its invocation without it, so that part is shared with the base model.
"""

from __future__ import annotations

import codecs
import ctypes
import json
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import gguf
import llama_cpp
import numpy as np
import psutil
from llama_cpp import llama_grammar
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from edge_runtime.cores import core_budget, native_threads
from edge_runtime.errors import (
    ContextOverflow,
    GenerationTimeout,
    InvalidGGUF,
    InvalidRequest,
    InvalidSettings,
    LlamaCppError,
    RuntimeClosed,
)
from edge_runtime.gguf import keys
from edge_runtime.profiles import KV_TYPES
from edge_runtime.runtime import activation
from edge_runtime.runtime.chat import ChatTemplate
from edge_runtime.runtime.generation import Chunk, Generation, SamplingParams, TokenLogprob, token_logprob
from edge_runtime.runtime.governor import ThreadGovernor, read_now, thread_invariant
from edge_runtime.runtime.grammar import (
    check_bounded,
    check_grammar,
    check_schema,
    converter_problem,
    refused,
    with_json_strings,
)
from edge_runtime.runtime.handles import AdapterHandle, AdapterSet
from edge_runtime.runtime.plan import EngineSettings
from edge_runtime.runtime.stops import StopMatcher
from edge_runtime.runtime.threadpool import ThreadPool

__all__ = ["AdapterHandle", "AdapterSet", "Engine", "EngineSettings"]
log = logging.getLogger(__name__)
T = TypeVar("T")


class Engine:
    """One llama.cpp model and context, with adapters switched in and out without reloading the model."""

    def __init__(self, model_path: Path | str, settings: EngineSettings | None = None) -> None:
        self.settings = settings or EngineSettings()
        self.model_path = Path(model_path)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-rt-engine")
        self._worker_thread: threading.Thread | None = None
        self.worker_thread_id: int | None = None  # the native id of the thread that runs every llama.cpp call
        self._active: tuple[tuple[AdapterHandle, float], ...] = ()
        self._active_key: tuple[tuple[str, float], ...] = ()
        self._llama: Any = None
        self._pool: ThreadPool | None = None
        self.last_reused_tokens = 0  # prompt tokens the last generation took from the KV cache
        self.evaluated_tokens = 0  # prompt tokens evaluated (not taken from the KV cache) since start
        self._plan: activation.Plan[AdapterHandle] = activation.plan([], ())  # what computed each cached position
        self.switches = 0  # times the active adapter set changed
        self.decoded_tokens = 0  # tokens generated since start
        self.grammar_slices = 0  # slices of the vocabulary a request's grammar checked (_GrammarGuard)
        self.grammar_interrupts = 0  # tokens whose grammar check stopped part-way (cancelled or past a deadline)
        self._guard: _GrammarGuard | None = None
        self._closed = False
        self._readers = 0  # tokenizations running on callers' threads: the model is freed only after them
        self._readers_done = threading.Condition()
        self._call(self._load)

    # -- threading ------------------------------------------------------------------------------------------------

    def _call(self, function: Callable[..., T], *args: Any) -> T:
        """Run ``function`` on the worker thread and wait for it (directly when already on it)."""
        if threading.current_thread() is self._worker_thread:
            return function(*args)
        return self._submit(function, *args).result()

    def _submit(self, function: Callable[..., T], *args: Any) -> Future[T]:
        if self._closed:
            raise RuntimeClosed()

        def run() -> T:
            self._worker_thread, self.worker_thread_id = threading.current_thread(), threading.get_native_id()
            return function(*args)

        return self._worker.submit(run)

    # -- model ----------------------------------------------------------------------------------------------------

    def _load(self) -> None:
        settings = self.settings
        n_gpu_layers = settings.n_gpu_layers
        if n_gpu_layers and not llama_cpp.llama_supports_gpu_offload():
            log.warning(
                "this llama.cpp build cannot offload to a GPU; running all layers on the CPU "
                "(install with EDGE_RT_CMAKE_ARGS=-DGGML_CUDA=on, or similar, for GPU offload)"
            )
            n_gpu_layers = 0
        if settings.kv_type not in KV_TYPES:
            raise InvalidSettings("kv_type", settings.kv_type, f"must be one of {', '.join(KV_TYPES)}")
        kv = gguf.GGMLQuantizationType[settings.kv_type.upper()].value  # the ggml_type id llama.cpp takes
        threads = settings.n_threads or min(psutil.cpu_count(logical=False) or 1, core_budget().usable)
        try:
            self._llama = llama_cpp.Llama(
                model_path=str(self.model_path),
                n_ctx=settings.n_ctx,
                n_batch=settings.n_batch,
                n_ubatch=settings.n_ubatch,
                n_threads=threads,
                n_threads_batch=threads,
                n_gpu_layers=n_gpu_layers,
                use_mmap=True,
                flash_attn=True,
                type_k=kv,
                type_v=kv,
                logits_all=settings.logits_all,
                verbose=False,
            )
        except ValueError as exc:
            raise InvalidGGUF(str(self.model_path), f"llama.cpp could not load it ({exc})") from exc
        self.threads = threads  # the most any step runs (the governor may run fewer)
        self.running_threads = threads
        self.governor = ThreadGovernor(
            threads,
            enabled=settings.shed_threads and thread_invariant(settings.kv_type),
            read=lambda: read_now(lambda: native_threads(self.worker_thread_id)),
        )
        self._pool = ThreadPool.unless_openmp(
            llama_cpp, self._llama.ctx, threads, settings.pool_poll, settings.pool_prio
        )
        self.max_token_bytes = self._longest_piece()
        metadata = self._llama.metadata
        template = metadata.get(keys.CHAT_TEMPLATE)
        self._eos = int(self._llama.token_eos())
        self._chat = (
            None
            if template is None
            else ChatTemplate(
                Jinja2ChatFormatter(
                    template=template,
                    eos_token=self._token_text(self._eos),
                    bos_token=self._token_text(int(self._llama.token_bos())),
                    stop_token_ids=[self._eos],
                ),
                self._tokens,
            )
        )

    def _longest_piece(self) -> int:
        """Bytes of the longest text one token stands for (ordinary text, not control tokens)."""
        vocab, buffer = self._llama._model.vocab, ctypes.create_string_buffer(512)  # longer: its length, negated
        return max(
            1,
            *(
                abs(int(llama_cpp.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, False)))
                for token in range(self._llama.n_vocab())
            ),
        )

    def min_tokens(self, byte_count: int) -> int:
        """The fewest tokens ``byte_count`` bytes of text can become: no token covers more than the longest piece."""
        return -(-byte_count // self.max_token_bytes)

    def _token_text(self, token: int) -> str:
        return "" if token < 0 else self._llama._model.token_get_text(token)

    @property
    def n_vocab(self) -> int:
        """Vocabulary size of the base model."""
        return int(self._llama.n_vocab())

    @property
    def n_ctx(self) -> int:
        """Context length in tokens the context was created with."""
        return int(self._llama.n_ctx())

    def close(self) -> None:
        """Detach adapters, free the context and the model, stop the worker (adapters are freed by their owner);
        tokenizations running on other threads finish first (freeing the vocabulary under them crashed the daemon
        on SIGTERM), new ones raise ``RuntimeClosed``."""
        if self._closed:
            return
        future = self._submit(self._close)
        with self._readers_done:
            self._closed = True  # before the close runs: nothing may be queued behind it, no tokenization start
            self._readers_done.wait_for(lambda: self._readers == 0)
        future.result()
        self._worker.shutdown(wait=True)

    def _close(self) -> None:
        self._set_adapters(())
        self._llama.close()
        if self._pool is not None:
            self._pool.free()

    # -- adapters -------------------------------------------------------------------------------------------------

    def load_adapter(self, path: Path | str, *, content_id: str) -> AdapterHandle:
        """Load a GGUF LoRA into memory (not yet active); ``content_id`` (its sha256) keys KV-cache reuse."""
        return self._call(self._load_adapter, Path(path), content_id)

    def _load_adapter(self, path: Path, content_id: str) -> AdapterHandle:
        pointer = llama_cpp.llama_adapter_lora_init(self._llama.model, str(path).encode())
        if not pointer:
            raise InvalidGGUF(str(path), "llama.cpp refused the LoRA adapter (see its log for the tensor at fault)")
        count = int(llama_cpp.llama_adapter_get_alora_n_invocation_tokens(pointer))  # adapter.alora.invocation_tokens
        tokens = llama_cpp.llama_adapter_get_alora_invocation_tokens(pointer) if count else []
        return AdapterHandle(pointer, path, content_id, tuple(int(tokens[i]) for i in range(count)))

    def free_adapter(self, handle: AdapterHandle) -> None:
        """Release an adapter's memory, detaching it from the context first (freeing an attached one is a bug)."""
        self._call(self._free_adapter, handle)

    def _free_adapter(self, handle: AdapterHandle) -> None:
        if handle.freed:
            return
        if any(active is handle for active, _ in self._active):
            self._set_adapters(tuple((h, s) for h, s in self._active if h is not handle))
        llama_cpp.llama_adapter_lora_free(handle.pointer)
        handle._pointer = None

    def set_adapters(self, adapters: AdapterSet) -> bool:
        """Make ``adapters`` (handle, scale) the active set; return True when that changed what the model computes."""
        return self._call(self._set_adapters, tuple(adapters))

    def _set_adapters(self, adapters: tuple[tuple[AdapterHandle, float], ...]) -> bool:
        key = tuple((h.content_id, float(s)) for h, s in adapters)
        if key == self._active_key:
            return False
        count = len(adapters)
        pointers = (llama_cpp.llama_adapter_lora_p_ctypes * max(count, 1))(*[h.pointer for h, _ in adapters])
        scales = (ctypes.c_float * max(count, 1))(*[float(s) for _, s in adapters])
        if (
            llama_cpp.llama_set_adapters_lora(
                self._llama.ctx, pointers if count else None, count, scales if count else None
            )
            != 0
        ):
            raise LlamaCppError(f"apply the adapter set {[h.path.name for h, _ in adapters]}")
        self._active = adapters
        self._active_key = key
        self.switches += 1  # the KV cache stays: each position is keyed by the set that computed it (self._plan)
        return True

    # -- text -----------------------------------------------------------------------------------------------------

    # Tokenising reads only the vocabulary, never the context, so it runs on the caller's thread: a request can be
    # measured against the context size while another request is decoding. It takes ~1 s per megabyte: the daemon
    # calls it off the event loop, after ``min_tokens`` has turned away text too long for the context whatever it is.

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of ``text`` in the base model's vocabulary."""
        with self._reading():
            return list(self._llama.tokenize(text.encode(), add_bos=add_bos, special=special))

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """Count a tokenization running on the caller's thread, so ``close`` waits for it."""
        with self._readers_done:
            if self._closed:
                raise RuntimeClosed()
            self._readers += 1
        try:
            yield
        finally:
            with self._readers_done:
                self._readers -= 1
                self._readers_done.notify_all()

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Text of ``tokens`` (invalid UTF-8 sequences replaced)."""
        return str(self._llama.detokenize(list(tokens)).decode("utf-8", errors="replace"))

    def chat_prompt(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Token ids of ``messages`` rendered with the model's own chat template (from its GGUF).

        Only the template's own text may become control tokens: message contents are tokenized as plain text, so
        ``<|im_end|><|im_start|>system`` typed by a user stays text and cannot forge a turn.
        """
        if self._chat is None:
            raise InvalidRequest("the base model has no chat template; use /v1/completions with a prompt")
        with self._reading():
            return self._chat.tokens(messages)

    def _tokens(self, text: str, *, special: bool) -> list[int]:
        return list(self._llama.tokenize(text.encode(), add_bos=False, special=special)) if text else []

    # -- grammars -------------------------------------------------------------------------------------------------

    def json_grammar(self, schema: dict[str, Any] | None = None) -> str:
        """GBNF text that makes the output one JSON object (``schema`` None) or JSON matching ``schema``.

        Raises ``InvalidRequest`` (param ``response_format``) for a schema llama.cpp cannot turn into a grammar.
        Runs on the caller's thread (a grammar reads only the vocabulary); a large schema takes seconds to convert.
        """
        if schema is None:
            grammar = llama_grammar.JSON_GBNF
        else:
            check_schema(schema)
            try:
                grammar = with_json_strings(llama_grammar.json_schema_to_gbnf(json.dumps(schema)))
            except Exception as exc:  # the converter asserts (or fails in any way) on what it does not support
                raise refused(converter_problem(exc)) from exc
            check_grammar(grammar)
        self._check_parses(grammar)
        return grammar

    def _check_parses(self, grammar: str) -> None:
        # Llama.generate() adds a grammar to its sampler without checking that llama.cpp parsed it: a grammar that
        # does not parse becomes a NULL sampler in the chain and the process segfaults (llama-cpp-python 0.3.36).
        check_grammar(grammar)
        sampler = llama_cpp.llama_sampler_init_grammar(self._llama._model.vocab, grammar.encode(), b"root")
        if not sampler:
            raise refused("llama.cpp's grammar parser rejected it (its reason is in the daemon's log)")
        llama_cpp.llama_sampler_free(sampler)
        check_bounded(grammar, self.n_vocab)

    # -- evaluation -----------------------------------------------------------------------------------------------

    def logits(self, tokens: Sequence[int], adapters: AdapterSet | None = None) -> np.ndarray:
        """Logits (n_tokens × vocab, float32) of ``tokens`` from an empty cache, under ``adapters`` if given (else the
        active set), as a generation computes them: an aLoRA from its last invocation in ``tokens`` on."""
        if not self.settings.logits_all:
            raise InvalidSettings("logits_all", False, "logits() needs EngineSettings(logits_all=True)")
        return self._call(self._logits, list(tokens), None if adapters is None else tuple(adapters))

    def _logits(self, tokens: list[int], adapters: tuple[tuple[AdapterHandle, float], ...] | None) -> np.ndarray:
        self._llama.reset()
        self._prefill(tokens, activation.plan(tokens, self._active if adapters is None else adapters))
        self._llama.eval(tokens[self._llama.n_tokens :])
        return np.array(self._llama.scores[: len(tokens)], dtype=np.float32, copy=True)

    # -- generation -----------------------------------------------------------------------------------------------

    def stream(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        *,
        adapters: AdapterSet = (),
        cancel: threading.Event | None = None,
    ) -> Iterator[Chunk]:
        """Generate under ``adapters``, yielding text as it is produced; closing the iterator cancels."""
        cancel = cancel or threading.Event()
        chunks: queue.Queue[Chunk | BaseException] = queue.Queue()
        self._submit(self._generate_into, list(prompt), params, tuple(adapters), cancel, chunks)
        try:
            while True:
                item = chunks.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            cancel.set()

    def generate(self, prompt: Sequence[int], params: SamplingParams, *, adapters: AdapterSet = ()) -> Generation:
        """Generate from ``prompt`` under ``adapters`` and return the whole text."""
        result = Generation(text="", completion_tokens=0, prompt_tokens=len(prompt), finish_reason="stop")
        for chunk in self.stream(prompt, params, adapters=adapters):
            result.text += chunk.text
            result.token_ids.extend(chunk.token_ids)
            result.logprobs.extend(chunk.logprobs)
            result.finish_reason = chunk.finish_reason or result.finish_reason
        result.completion_tokens = len(result.token_ids)
        return result

    def _generate_into(
        self,
        prompt: list[int],
        params: SamplingParams,
        adapters: tuple[tuple[AdapterHandle, float], ...],
        cancel: threading.Event,
        chunks: queue.Queue[Chunk | BaseException],
    ) -> None:
        try:
            for chunk in self._generate(prompt, params, adapters, cancel):
                chunks.put(chunk)
        except BaseException as exc:  # the consumer thread re-raises it
            chunks.put(exc)
        finally:
            # llama-cpp-python makes a sampler per generate() that refers to itself, so only the cyclic GC frees
            # it: ~1.8 MiB each on Gemma's 262k vocabulary, 18 MiB of RSS per ten requests until a collection.
            sampler, self._llama._sampler = self._llama._sampler, None
            if sampler is not None:
                sampler.close()
            guard, self._guard = self._guard, None
            if guard is not None:
                guard.close()

    def _generate(
        self,
        prompt: list[int],
        params: SamplingParams,
        adapters: tuple[tuple[AdapterHandle, float], ...],
        cancel: threading.Event,
    ) -> Iterator[Chunk]:
        if not prompt:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if params.grammar is not None:
            self._check_parses(params.grammar)
        if cancel.is_set():
            yield Chunk("", finish_reason="cancelled")
            return
        _check_deadline(params, 0)
        n_ctx = int(self._llama.n_ctx())
        if len(prompt) >= n_ctx:
            raise ContextOverflow(prompt_tokens=len(prompt), context_tokens=n_ctx)
        self.last_reused_tokens = self._prefill(prompt, activation.plan(prompt, adapters))  # (grammar: never KV)
        budget = min(params.max_tokens, n_ctx - len(prompt))
        self._llama.set_seed(params.seed if params.seed is not None else random.getrandbits(31))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopMatcher(params.stop)
        if params.grammar is not None:
            self._guard = _GrammarGuard(
                self,
                params.grammar,
                len(prompt),
                lambda: cancel.is_set() or (params.deadline is not None and time.monotonic() > params.deadline),
            )
        tokens = self._llama.generate(
            prompt,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=0.0,
            temp=params.temperature,
            repeat_penalty=1.0,
            logits_processor=None if self._guard is None else [self._guard],
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
        )
        produced = 0
        for token in tokens:
            self._pace_threads()  # for the step that decodes ``token`` when the loop asks for the next one
            if cancel.is_set():
                yield Chunk("", finish_reason="cancelled")
                return
            _check_deadline(params, produced)
            if token == self._eos or llama_cpp.llama_vocab_is_eog(self._llama._model.vocab, token):
                yield Chunk(stops.flush(), finish_reason="stop")
                return
            produced += 1
            self.decoded_tokens += 1
            # The logits of the sampled position stay in the context until the generator decodes the next token.
            logprobs = () if params.logprobs is None else (self._logprob(token, params.logprobs),)
            text, stopped = stops.feed(decoder.decode(self._llama.detokenize([token], special=False)))
            if stopped:
                yield Chunk(text, (token,), finish_reason="stop", logprobs=logprobs)
                return
            if produced >= budget:
                yield Chunk(text + stops.flush(), (token,), finish_reason="length", logprobs=logprobs)
                return
            yield Chunk(text, (token,), logprobs=logprobs)

    def _pace_threads(self) -> None:
        """Run the next llama.cpp step on as many threads as the governor says (a call only when that changes)."""
        count = self.governor.next_step()
        if count != self.running_threads:
            llama_cpp.llama_set_n_threads(self._llama.ctx, count, count)
            self.running_threads = count

    def _logprob(self, token: int, alternatives: int) -> TokenLogprob:
        """From the logits ``token`` was sampled from: the model's own, before penalties, grammar and temperature."""
        logits = np.ctypeslib.as_array(self._llama._ctx.get_logits_ith(-1), shape=(self.n_vocab,))
        return token_logprob(logits, token, alternatives, lambda t: bytes(self._llama.detokenize([t], special=True)))

    def _prefill(self, prompt: list[int], plan: activation.Plan[AdapterHandle]) -> int:
        """Keep the cached prefix ``plan`` may reuse, evaluate the rest segment by segment under each one's adapter
        set, all but the last batch, which stays for ``generate`` (its logits are sampled); return the reused length."""
        cached = self._llama.input_ids[: self._llama.n_tokens].tolist()
        keep = activation.reusable_prefix(cached, self._plan, prompt, plan)
        self._llama.n_tokens = keep  # eval() and generate() drop the KV cells past it
        self._plan = plan
        self.governor.new_generation()
        self._pace_threads()
        limit = min(self.settings.n_batch, self.settings.n_ubatch)
        for segment, end in plan.spans(len(prompt)):
            if end > keep:
                self._set_adapters(segment.adapters)
                for start, stop in activation.batches(max(keep, segment.start), end, limit):
                    if stop < len(prompt):
                        self._llama.eval(prompt[start:stop])
        self.evaluated_tokens += len(prompt) - keep
        return keep


def _check_deadline(params: SamplingParams, produced: int) -> None:
    if params.deadline is not None and time.monotonic() > params.deadline:
        raise GenerationTimeout(deadline_s=params.deadline, completion_tokens=produced)


class _GrammarGuard:
    """A request's grammar as a logits processor: llama.cpp's own grammar sampler (the same masks, so the same
    answers as ``generate(grammar=...)``), applied to the vocabulary in slices with ``stop()`` asked between them, so
    that a cancel or a deadline ends even a token whose grammar work would take minutes. Each sampled token is
    accepted into the grammar on the next call (``input_ids`` then ends with it)."""

    SLICE = 2048  # tokens per llama.cpp call: a millisecond or two at the parse-state limit

    def __init__(self, engine: Engine, grammar: str, accepted: int, stop: Callable[[], bool]) -> None:
        self._engine = engine
        self._sampler = llama_cpp.llama_sampler_init_grammar(engine._llama._model.vocab, grammar.encode(), b"root")
        if not self._sampler:
            raise refused("llama.cpp's grammar parser rejected it (its reason is in the daemon's log)")
        self._accepted = accepted  # tokens of input_ids already in the grammar's state (the prompt: none of them)
        self._stop = stop

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        for token in input_ids[self._accepted :].tolist():
            llama_cpp.llama_sampler_accept(self._sampler, token)
        self._accepted = len(input_ids)
        # ``scores`` is the logit field of llama.cpp's candidate array (id, logit, p): mask it in place.
        entry = ctypes.sizeof(llama_cpp.llama_token_data)
        if scores.strides != (entry,):
            raise LlamaCppError(f"mask a grammar over candidates laid out with strides {scores.strides}")
        logit: Any = llama_cpp.llama_token_data.logit  # the field's descriptor (typed as a float)
        base = scores.ctypes.data - logit.offset
        for start in range(0, len(scores), self.SLICE):
            if self._stop():  # the caller sees the same condition before using the token sampled from this
                self._engine.grammar_interrupts += 1
                break
            count = min(self.SLICE, len(scores) - start)
            view = llama_cpp.llama_token_data_array(
                data=ctypes.cast(base + start * entry, ctypes.POINTER(llama_cpp.llama_token_data)),
                size=count,
                selected=-1,
                sorted=False,
            )
            llama_cpp.llama_sampler_apply(self._sampler, ctypes.byref(view))
            self._engine.grammar_slices += 1
        return scores

    def close(self) -> None:
        """Free the grammar's llama.cpp state."""
        if self._sampler:
            llama_cpp.llama_sampler_free(self._sampler)
            self._sampler = None
