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

Several sequences in one context: the context holds ``parallel`` llama.cpp sequences (slots), each with its own
KV stream of ``n_ctx`` cells (``kv_unified = false``). Generations queue for a slot; the worker runs them in steps:
each step serves one adapter set (``turns.py`` picks whose turn it is), evaluating at most one prompt batch of a
newly admitted sequence and then one token of every decoding sequence of that set in a single ``llama_decode``
(tokens carry their sequence id). A prompt batch never shares a ``llama_decode`` with other sequences' tokens: a
batch of 64 tokens or more takes other kernels than a small one, so mixing would make a prompt's KV depend on what
else runs. Each sequence has its own sampler chain (penalties, seed) and, for a grammar, its own grammar sampler
applied to the vocabulary in slices with the sequence's cancel and deadline checked between them, so that even a
token whose grammar work would take minutes ends within one decode step of a cancel or a deadline.

KV isolation: llama.cpp leaves cache consistency to the caller (``llama_set_adapters_lora`` never touches the KV
cache). Each slot records which adapter set computed each of its positions — each adapter's content digest and
scale, never its name — and a new generation reuses a prefix only where both the tokens and that set agree
(``activation.py``); an aLoRA's prompt is evaluated in segments, the part before its invocation without it, so that
part is shared with the base model, also across slots (``llama_memory_seq_cp``). A sequence's attention reads only
its own stream: nothing computed for another sequence is ever read by it.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import gguf
import llama_cpp
import numpy as np
import psutil
from llama_cpp import _internals as internals
from llama_cpp import llama_grammar
from llama_cpp._logger import set_verbose
from llama_cpp._utils import suppress_stdout_stderr
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from edge_runtime.cores import core_budget, native_threads
from edge_runtime.errors import (
    ContextOverflow,
    InvalidGGUF,
    InvalidRequest,
    InvalidSettings,
    LlamaCppError,
    RuntimeClosed,
)
from edge_runtime.gguf import keys
from edge_runtime.gguf.header import GGUFHeader, read_header
from edge_runtime.profiles import KV_TYPES
from edge_runtime.runtime import activation, budget, turns
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
from edge_runtime.runtime.sequence import Running
from edge_runtime.runtime.threadpool import ThreadPool

__all__ = ["AdapterHandle", "AdapterSet", "Engine", "EngineSettings"]
log = logging.getLogger(__name__)
T = TypeVar("T")
Deliver = Callable[[Chunk | BaseException], None]

PENALTY_LAST_N = 64  # generated tokens the presence/frequency penalties count (llama-cpp-python's default)
GRAMMAR_SLICE = 2048  # vocabulary entries per grammar call between cancel/deadline checks: a ms or two at the limit
MIN_SHARED_TOKENS = 16  # copying another slot's KV stream costs a buffer copy: worth it from this many tokens on
# llama.cpp's CPU kernels for repacked weights (Q4_0, Q4_K, IQ4_NL: budget.REPACKED_TYPES) multiply 4 or more rows
# with a 4-row GEMM and fewer one row at a time (GEMV): the same row rounds differently in each (Gemma 3 270M Q4_K_M:
# greedy answers diverged at 4 rows, were identical at 2 and 3). A single sequence decodes by GEMV, so with such
# weights a decode step evaluates at most this many sequences per llama_decode; other weights compute each row the
# same way at any batch size (SmolLM2 Q4_1: logits equal to the bit at 1, 2 and 4 rows).
GEMV_MAX_ROWS = 3
# llama.cpp built with llamafile's sgemm (LLAMAFILE = 1 in its system info) multiplies float weights (f32, f16,
# bf16: LoRA adapters, float base models) by two or more rows with tinyBLAS and one row with ggml's own dot product,
# which round differently (SmolLM2 with an f32 LoRA: a greedy answer changed at token 22 of 24). Such weights decode
# one sequence per llama_decode there; a build without it (-DGGML_LLAMAFILE=OFF) batches them too.
FLOAT_TYPES = frozenset({gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16})
# llama.cpp's CPU flash attention, with an f32 or f16 KV cache, splits the cells of a lone one-token query (one
# sequence in the llama_decode) into one chunk per thread once it reads SPLIT_KV_CELLS cells or more, and merges the
# chunks' partial sums; several sequences' queries (one stream each) are computed unsplit, cell after cell. The two
# round differently (SmolLM2, f16 KV, a 490-token prompt: 58 of 60 logprobs changed, by up to 0.02). The cells a
# query reads are its stream's used cells padded to KV_PAD (llama_kv_cache::get_n_kv), so a sequence whose next
# position is KV_PAD or more decodes in its own llama_decode there. A quantised KV cache never takes the split path.
SPLIT_KV_CELLS = 512
KV_PAD = 256
FLOAT_KV_TYPES = frozenset({"f32", "f16"})
# llama.cpp's llama_token_data (id, logit, p) as a numpy record: candidates are built and masked in numpy's memory
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
_backend = threading.Lock()
_backend_ready = False


@dataclass
class _Slot:
    """One llama.cpp sequence id and what its KV stream holds: tokens at positions 0.. and what computed them."""

    seq_id: int
    tokens: list[int] = field(default_factory=list)
    prompt: int = 0  # how many of ``tokens`` were evaluated as the prompt of ``plan`` (the rest: generated tokens)
    plan: activation.Plan[AdapterHandle] = field(default_factory=lambda: activation.plan([], ()))
    owner: Running | None = None


class Engine:
    """One llama.cpp model and context, with adapters switched in and out without reloading the model."""

    def __init__(self, model_path: Path | str, settings: EngineSettings | None = None) -> None:
        self.settings = settings or EngineSettings()
        if self.settings.parallel < 1:
            raise InvalidSettings("parallel", self.settings.parallel, "must be at least 1")
        self.model_path = Path(model_path)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-rt-engine")
        self._worker_thread: threading.Thread | None = None
        self.worker_thread_id: int | None = None  # the native id of the thread that runs every llama.cpp call
        self._active: tuple[tuple[AdapterHandle, float], ...] = ()
        self._active_key: tuple[tuple[str, float], ...] = ()
        self._stack = ExitStack()
        self._model: Any = None
        self._ctx: Any = None
        self._batch: Any = None
        self._pool: ThreadPool | None = None
        self.threads = 0  # the most threads any step runs, fixed once the context exists (the governor may run fewer)
        self.running_threads = 0  # threads the last step ran
        self.governor = ThreadGovernor(1, enabled=False, read=lambda: read_now(list))  # replaced once loaded
        self._slots = [_Slot(seq_id) for seq_id in range(self.settings.parallel)]
        self._waiting: deque[Running] = deque()
        self._running: list[Running] = []
        self._arrivals = itertools.count()
        self._tick_pending = False
        self._last_served: dict[activation.Key, int] = {}  # adapter set → the turn it was last served in
        self._turn: activation.Key | None = None  # the set whose turn it is
        self._turn_began = 0.0
        self.turn_s = self.settings.turn_s  # how long a turn serves one set (turns.py)
        self.turns = 0  # turns taken (a turn serves one adapter set for up to turn_s)
        self.steps = 0  # engine steps run (each serves one adapter set)
        self.decode_steps = 0  # steps that decoded generated tokens (one token of each decoding sequence of one set)
        self.decode_step_tokens = 0  # tokens those steps decoded: sequences per step on average is this / decode_steps
        self.decode_calls = 0  # llama_decode calls of those steps (several when exact answers need fewer rows each)
        self.last_batch_size = 0  # sequences the last decode step decoded
        self.last_batch_rows = 0  # the most of them one llama_decode of that step carried (exact_decode_rows)
        self.last_reused_tokens = 0  # prompt tokens the last admitted generation took from the KV cache
        self.shared_tokens = 0  # prompt tokens taken from another slot's KV (seq_cp) since start
        self.evaluated_tokens = 0  # prompt tokens evaluated (not taken from the KV cache) since start
        self.switches = 0  # times the active adapter set changed
        self.decoded_tokens = 0  # tokens generated since start
        self.grammar_slices = 0  # slices of the vocabulary a request's grammar checked
        self.grammar_interrupts = 0  # tokens whose grammar check stopped part-way (cancelled or past a deadline)
        # Called on the worker after each decode step with (tokens decoded, seconds the step took, sampling included)
        self.on_decode_step: Callable[[int, float], None] | None = None
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
        return self._worker.submit(self._on_worker, function, *args)

    def _on_worker(self, function: Callable[..., T], *args: Any) -> T:
        self._worker_thread, self.worker_thread_id = threading.current_thread(), threading.get_native_id()
        return function(*args)

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
        _init_backend()
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = n_gpu_layers
        model_params.use_mmap = True
        try:
            self._model = self._stack.enter_context(
                closing(internals.LlamaModel(path_model=str(self.model_path), params=model_params, verbose=False))
            )
        except ValueError as exc:
            raise InvalidGGUF(str(self.model_path), f"llama.cpp could not load it ({exc})") from exc
        self.threads = settings.n_threads or min(psutil.cpu_count(logical=False) or 1, core_budget().usable)
        self.running_threads = self.threads
        self.governor = ThreadGovernor(
            self.threads,
            enabled=settings.shed_threads and thread_invariant(settings.kv_type),
            read=lambda: read_now(lambda: native_threads(self.worker_thread_id)),
        )
        self._ctx = self._stack.enter_context(
            closing(internals.LlamaContext(model=self._model, params=self._context_params(), verbose=False))
        )
        self._pool = ThreadPool.unless_openmp(
            llama_cpp, self._ctx.ctx, self.threads, settings.pool_poll, settings.pool_prio
        )
        self._memory = llama_cpp.llama_get_memory(self._ctx.ctx)
        self._batch = llama_cpp.llama_batch_init(max(settings.n_batch, settings.parallel), 0, 1)
        self._stack.callback(llama_cpp.llama_batch_free, self._batch)
        self._vocab = self._model.vocab
        self._n_vocab = int(self._model.n_vocab())
        self._token_ids = np.arange(self._n_vocab, dtype=np.int32)
        if _TOKEN_DATA.itemsize != ctypes.sizeof(llama_cpp.llama_token_data):
            raise LlamaCppError(
                f"lay out candidates: llama_token_data is {ctypes.sizeof(llama_cpp.llama_token_data)} bytes"
            )
        header = read_header(self.model_path)
        self._llamafile = b"LLAMAFILE = 1" in llama_cpp.llama_print_system_info()
        self._float_kv = settings.kv_type in FLOAT_KV_TYPES
        self.decode_rows = exact_decode_rows(
            parallel=settings.parallel,
            llamafile=self._llamafile,
            repacked=budget.ModelShape.from_header(header).repacked_bytes > 0,
            float_weights=_has_float_matrices(header),
        )
        self.max_token_bytes = self._longest_piece()
        metadata = self._model.metadata()
        template = metadata.get(keys.CHAT_TEMPLATE)
        self._eos = int(self._model.token_eos())
        self._chat = (
            None
            if template is None
            else ChatTemplate(
                Jinja2ChatFormatter(
                    template=template,
                    eos_token=self._token_text(self._eos),
                    bos_token=self._token_text(int(self._model.token_bos())),
                    stop_token_ids=[self._eos],
                ),
                self._tokens,
            )
        )

    def _context_params(self) -> Any:
        """llama.cpp context parameters: ``parallel`` sequences with ``n_ctx`` cells of KV each, flash attention."""
        settings = self.settings
        kv = gguf.GGMLQuantizationType[settings.kv_type.upper()].value  # the ggml_type id llama.cpp takes
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = settings.n_ctx * settings.parallel
        params.n_batch = settings.n_batch
        params.n_ubatch = min(settings.n_ubatch, settings.n_batch)
        params.n_seq_max = settings.parallel
        params.kv_unified = False  # one KV stream per sequence: its attention never reads another's cells
        params.n_threads = params.n_threads_batch = self.threads
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.type_k = params.type_v = kv
        params.embeddings = False
        return params

    def _longest_piece(self) -> int:
        """Bytes of the longest text one token stands for (ordinary text, not control tokens)."""
        buffer = ctypes.create_string_buffer(512)  # longer: its length, negated
        return max(
            1,
            *(
                abs(int(llama_cpp.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, False)))
                for token in range(self._n_vocab)
            ),
        )

    def min_tokens(self, byte_count: int) -> int:
        """The fewest tokens ``byte_count`` bytes of text can become: no token covers more than the longest piece."""
        return -(-byte_count // self.max_token_bytes)

    def _token_text(self, token: int) -> str:
        return "" if token < 0 else str(self._model.token_get_text(token))

    @property
    def n_vocab(self) -> int:
        """Vocabulary size of the base model."""
        return self._n_vocab

    @property
    def n_ctx(self) -> int:
        """Context length in tokens each sequence has."""
        return int(llama_cpp.llama_n_ctx(self._ctx.ctx)) // self.settings.parallel

    @property
    def parallel(self) -> int:
        """Sequences the engine decodes together."""
        return self.settings.parallel

    @property
    def running_sequences(self) -> int:
        """Generations holding a sequence slot now."""
        return len(self._running)

    @property
    def waiting_sequences(self) -> int:
        """Generations waiting for a free sequence slot."""
        return len(self._waiting)

    def close(self) -> None:
        """End running generations (finish_reason "cancelled"), detach adapters, free the context and the model,
        stop the worker (adapters are freed by their owner); tokenizations running on other threads finish first
        (freeing the vocabulary under them crashed the daemon on SIGTERM), new ones raise ``RuntimeClosed``."""
        if self._closed:
            return
        future = self._submit(self._close)
        with self._readers_done:
            self._closed = True  # before the close runs: nothing may be queued behind it, no tokenization start
            self._readers_done.wait_for(lambda: self._readers == 0)
        future.result()
        self._worker.shutdown(wait=True)

    def _close(self) -> None:
        for running in [*self._running, *self._waiting]:
            self._end(running, running.cancelled())
        self._waiting.clear()
        self._set_adapters(())
        self._stack.close()
        self._ctx = None
        if self._pool is not None:  # after the context that used it
            self._pool.free()

    # -- adapters -------------------------------------------------------------------------------------------------

    def load_adapter(self, path: Path | str, *, content_id: str) -> AdapterHandle:
        """Load a GGUF LoRA into memory (not yet active); ``content_id`` (its sha256) keys KV-cache reuse."""
        return self._call(self._load_adapter, Path(path), content_id)

    def _load_adapter(self, path: Path, content_id: str) -> AdapterHandle:
        pointer = llama_cpp.llama_adapter_lora_init(self._model.model, str(path).encode())
        if not pointer:
            raise InvalidGGUF(str(path), "llama.cpp refused the LoRA adapter (see its log for the tensor at fault)")
        count = int(llama_cpp.llama_adapter_get_alora_n_invocation_tokens(pointer))  # adapter.alora.invocation_tokens
        tokens = llama_cpp.llama_adapter_get_alora_invocation_tokens(pointer) if count else []
        return AdapterHandle(
            pointer,
            path,
            content_id,
            tuple(int(tokens[i]) for i in range(count)),
            float_weights=_has_float_matrices(read_header(path)),
        )

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
                self._ctx.ctx, pointers if count else None, count, scales if count else None
            )
            != 0
        ):
            raise LlamaCppError(f"apply the adapter set {[h.path.name for h, _ in adapters]}")
        self._active = adapters
        self._active_key = key
        self.switches += 1  # the KV cache stays: each position is keyed by the set that computed it (slot plans)
        return True

    # -- text -----------------------------------------------------------------------------------------------------

    # Tokenising reads only the vocabulary, never the context, so it runs on the caller's thread: a request can be
    # measured against the context size while another request is decoding. It takes ~1 s per megabyte: the daemon
    # calls it off the event loop, after ``min_tokens`` has turned away text too long for the context whatever it is.

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of ``text`` in the base model's vocabulary."""
        with self._reading():
            return list(self._model.tokenize(text.encode(), add_bos, special))

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
        return str(self._model.detokenize(list(tokens), special=False).decode("utf-8", errors="replace"))

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
        return list(self._model.tokenize(text.encode(), False, special)) if text else []

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
        # A grammar that does not parse becomes a NULL sampler: added to a chain, the process segfaults.
        check_grammar(grammar)
        sampler = llama_cpp.llama_sampler_init_grammar(self._vocab, grammar.encode(), b"root")
        if not sampler:
            raise refused("llama.cpp's grammar parser rejected it (its reason is in the daemon's log)")
        llama_cpp.llama_sampler_free(sampler)
        check_bounded(grammar, self.n_vocab)

    def clear_cache(self) -> None:
        """Drop the KV every idle sequence slot holds: the next prompts are evaluated from their first token."""
        self._call(self._clear_cache)

    def _clear_cache(self) -> None:
        for slot in self._slots:
            if slot.owner is None:
                self._truncate(slot, 0)

    # -- evaluation -----------------------------------------------------------------------------------------------

    def logits(self, tokens: Sequence[int], adapters: AdapterSet | None = None) -> np.ndarray:
        """Logits (n_tokens × vocab, float32) of ``tokens`` from an empty cache, under ``adapters`` if given (else the
        active set), as a generation computes them: an aLoRA from its last invocation in ``tokens`` on."""
        if not self.settings.logits_all:
            raise InvalidSettings("logits_all", False, "logits() needs EngineSettings(logits_all=True)")
        return self._call(self._logits, list(tokens), None if adapters is None else tuple(adapters))

    def _logits(self, tokens: list[int], adapters: tuple[tuple[AdapterHandle, float], ...] | None) -> np.ndarray:
        slot = next((s for s in self._slots if s.owner is None), None)
        if slot is None:
            raise InvalidRequest("every sequence slot is generating; logits() needs a free one")
        self._truncate(slot, 0)
        plan = activation.plan(tokens, self._active if adapters is None else adapters)
        rows: list[np.ndarray] = []
        for segment, end in plan.spans(len(tokens)):
            self._set_adapters(segment.adapters)
            for start, stop in activation.batches(segment.start, end, self._prompt_batch):
                self._decode([(slot.seq_id, pos, tokens[pos], True) for pos in range(start, stop)])
                rows.extend(self._logits_row(index).copy() for index in range(stop - start))
        slot.tokens, slot.plan, slot.prompt = list(tokens), plan, len(tokens)
        return np.array(rows, dtype=np.float32)

    def _logits_row(self, index: int) -> np.ndarray:
        """The logits of output ``index`` of the last ``llama_decode`` (a view into llama.cpp's buffer)."""
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx.ctx, index), shape=(self._n_vocab,))

    @property
    def _prompt_batch(self) -> int:
        """Most prompt tokens one ``llama_decode`` evaluates: a fixed bound, so a long prompt is evaluated in the
        same batches whatever runs beside it, interleaved with the other sequences' decode steps."""
        return min(self.settings.n_batch, self.settings.n_ubatch)

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
        self.start(prompt, params, adapters=adapters, cancel=cancel, deliver=chunks.put)
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

    def start(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        *,
        adapters: AdapterSet = (),
        cancel: threading.Event,
        deliver: Deliver,
    ) -> None:
        """Queue a generation under ``adapters``: ``deliver`` receives, on the engine's thread, each chunk as it is
        produced (the last one has a ``finish_reason``) or the exception that ended it. Setting ``cancel`` ends
        it within one step. Generations beyond ``parallel`` wait for a free sequence slot, oldest first."""
        running = Running(prompt, params, tuple(adapters), cancel=cancel, deliver=deliver, arrival=next(self._arrivals))
        self._submit(self._enqueue, running)

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

    def _enqueue(self, running: Running) -> None:
        try:
            self._check(running)
        except BaseException as exc:  # the caller's deliver hands it on
            running.deliver(exc)
            return
        self._waiting.append(running)
        self._schedule_tick()

    def _check(self, running: Running) -> None:
        if not running.prompt:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if running.params.grammar is not None:
            self._check_parses(running.params.grammar)
        if len(running.prompt) >= self.n_ctx:
            raise ContextOverflow(prompt_tokens=len(running.prompt), context_tokens=self.n_ctx)

    def _schedule_tick(self) -> None:
        if not self._tick_pending:
            self._tick_pending = True
            self._worker.submit(self._on_worker, self._tick)

    def _tick(self) -> None:
        """One step, then the next one queued behind whatever else was asked of the worker meanwhile."""
        self._tick_pending = False
        if self._ctx is None:
            return
        try:
            self._step()
        except Exception as exc:  # a bug: end every generation with it rather than leave their callers waiting
            log.exception("an engine step failed; ending every running generation")
            for running in [*self._running, *self._waiting]:
                self._end(running, exc, forget=True)
            self._waiting.clear()
        if self._running or self._waiting:
            self._schedule_tick()

    def _step(self) -> None:
        """End cancelled generations, admit waiting ones to free slots, serve one adapter set's turn."""
        self.steps += 1
        for running in [r for r in self._running if r.interrupted()]:
            self._end(running, running.ending())
        if any(r.interrupted() for r in self._waiting):
            for running in [r for r in self._waiting if r.interrupted()]:
                self._waiting.remove(running)
                self._end(running, running.ending())
        for running in self._running:
            if running.leader is not None and (running.leader.finished or not running.leader.work):
                self._prepare(running)
        self._admit()
        groups: dict[activation.Key, list[Running]] = {}
        for running in self._running:
            if running.leader is None:
                groups.setdefault(running.next_key, []).append(running)
        now = time.monotonic()
        going_on = self._turn if now - self._turn_began < self.turn_s else None
        key = turns.next_turn(
            {k: min(r.arrival for r in g) for k, g in groups.items()}, self._last_served, current=going_on
        )
        if key is not None:
            if key != going_on:  # a new turn
                self.turns += 1
                self._turn, self._turn_began = key, now
                self._last_served = {k: v for k, v in self._last_served.items() if k in groups} | {key: self.turns}
            self._pace_threads()
            self._serve(groups[key])

    def _pace_threads(self) -> None:
        """Run the next step on as many threads as the governor says (a llama.cpp call only when that changes)."""
        count = self.governor.next_step()
        if count != self.running_threads:
            llama_cpp.llama_set_n_threads(self._ctx.ctx, count, count)
            self.running_threads = count

    def _admit(self) -> None:
        if self._waiting and not self._running:  # the engine sat idle: no measure of the device's load
            self.governor.new_generation()
        while self._waiting:
            free = [slot for slot in self._slots if slot.owner is None]
            if not free:
                return
            running = self._waiting.popleft()
            if running.interrupted():
                self._end(running, running.ending())
                continue
            try:
                self._occupy(running, free)
            except BaseException as exc:  # the caller's deliver hands it on
                self._end(running, exc, forget=True)

    def _occupy(self, running: Running, free: list[_Slot]) -> None:
        """Give ``running`` the free slot whose cache serves it best; prepare its prompt now, or once a sequence
        evaluating a longer shareable prefix (same tokens, same adapter sets) is done with its prompt."""
        slot = max(free, key=lambda s: (self._reusable(s, running), -s.seq_id))
        slot.owner, running.slot = running, slot.seq_id
        self._running.append(running)
        running.sampler = self._sampler(running.params)
        if running.params.grammar is not None:
            running.grammar = self._grammar_sampler(running.params.grammar)
        running.leader = self._leader(running)
        if running.leader is None:
            self._prepare(running)

    def _reusable(self, slot: _Slot, running: Running) -> int:
        """Prompt tokens of ``running`` the KV ``slot`` holds may serve."""
        return activation.reusable_prefix(
            slot.tokens, slot.plan, running.prompt, running.plan, cached_prompt=slot.prompt
        )

    def _leader(self, running: Running) -> Running | None:
        """A sequence still evaluating its prompt whose KV will serve ``running`` for more tokens than any slot
        holds now (by MIN_SHARED_TOKENS at least): base and aLoRA requests over one document evaluate it once."""
        best, length = None, max(self._reusable(slot, running) for slot in self._slots) + MIN_SHARED_TOKENS - 1
        for other in self._running:
            if other is running or other.leader is not None or not other.work:
                continue
            shared = activation.reusable_prefix(other.prompt, other.plan, running.prompt, running.plan)
            if shared > length:
                best, length = other, shared
        return best

    def _prepare(self, running: Running) -> None:
        """Keep the reusable prefix of ``running``'s slot, or copy a longer one from another slot, and queue the
        batches of the rest of its prompt."""
        running.leader = None
        slot = self._slots[running.slot or 0]
        keep = self._reusable(slot, running)
        source = max(self._slots, key=lambda s: (self._reusable(s, running), s is slot))
        if self._reusable(source, running) >= keep + MIN_SHARED_TOKENS:
            keep = self._reusable(source, running)
            llama_cpp.llama_memory_seq_cp(self._memory, source.seq_id, slot.seq_id, -1, -1)  # the whole stream
            slot.tokens = list(source.tokens)
            self.shared_tokens += keep
        self._truncate(slot, keep)
        slot.plan, slot.prompt = running.plan, len(running.prompt)
        running.plan_prefill(keep, self._prompt_batch, self.n_ctx)
        self.last_reused_tokens = keep

    def _truncate(self, slot: _Slot, keep: int) -> None:
        """Drop a slot's KV from position ``keep`` on."""
        llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, keep, -1)
        del slot.tokens[keep:]

    def _end(self, running: Running, last: Chunk | BaseException, *, forget: bool = False) -> None:
        """Free ``running``'s slot and sampler, then hand its caller the ``last`` item: a caller that sees the end
        finds the sequence already free."""
        self._release(running, forget=forget)
        running.deliver(last)

    def _release(self, running: Running, *, forget: bool = False) -> None:
        """Free a generation's sampler and slot (its KV stays as a cache for later prompts, unless ``forget``)."""
        if running.sampler is not None:
            llama_cpp.llama_sampler_free(running.sampler)
            running.sampler = None
        if running.grammar is not None:
            llama_cpp.llama_sampler_free(running.grammar)
            running.grammar = None
        if running.slot is not None:
            slot = self._slots[running.slot]
            slot.owner, running.slot = None, None
            if forget:
                self._truncate(slot, 0)
        if running in self._running:
            self._running.remove(running)

    def _sampler(self, params: SamplingParams) -> Any:
        """A sampler chain as llama-cpp-python's ``Llama.generate`` builds it: penalties over the generated tokens,
        then greedy or top-k / typical / top-p / min-p / temperature / seeded draw (a grammar is applied before the
        chain, by ``_sample_grammar``: masking and penalties commute, so the answers are those of one chain)."""
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = llama_cpp.llama_sampler_chain_add
        add(
            chain,
            llama_cpp.llama_sampler_init_penalties(
                self._n_vocab, PENALTY_LAST_N, 1.0, params.frequency_penalty, params.presence_penalty
            ),
        )
        if params.temperature == 0.0:
            add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            add(chain, llama_cpp.llama_sampler_init_top_k(params.top_k))
            add(chain, llama_cpp.llama_sampler_init_typical(1.0, 1))
            add(chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
            add(chain, llama_cpp.llama_sampler_init_min_p(0.0, 1))
            add(chain, llama_cpp.llama_sampler_init_temp(params.temperature))
            seed = params.seed if params.seed is not None else random.getrandbits(31)
            add(chain, llama_cpp.llama_sampler_init_dist(seed))
        return chain

    def _grammar_sampler(self, grammar: str) -> Any:
        sampler = llama_cpp.llama_sampler_init_grammar(self._vocab, grammar.encode(), b"root")
        if not sampler:  # checked when the request came: a NULL sampler would segfault the process
            raise refused("llama.cpp's grammar parser rejected it (its reason is in the daemon's log)")
        return sampler

    def _serve(self, members: list[Running]) -> None:
        """One adapter set's turn: one prompt batch of its oldest prefilling sequence, then one token of each of its
        decoding sequences, all in one ``llama_decode``."""
        prefilling = [r for r in members if r.work]
        decoding = sorted((r for r in members if not r.work and r.pending is not None), key=lambda r: r.slot or 0)
        try:
            if prefilling:
                self._prefill(min(prefilling, key=lambda r: r.arrival))
            if decoding:
                self._decode_step(decoding)
        except BaseException as exc:  # llama.cpp failed: these generations end with it, their slots are cleared
            for running in members:
                if not running.finished:
                    running.finished = True
                    self._end(running, exc, forget=True)

    def _prefill(self, running: Running) -> None:
        batch = running.work.popleft()
        slot = self._slots[running.slot or 0]
        self._set_adapters(batch.adapters)
        last = not running.work
        self._decode(
            [
                (slot.seq_id, pos, running.prompt[pos], last and pos == batch.stop - 1)
                for pos in range(batch.start, batch.stop)
            ]
        )
        slot.tokens.extend(running.prompt[batch.start : batch.stop])
        self.evaluated_tokens += batch.stop - batch.start
        if last:
            self._sample(running, batch.stop - batch.start - 1)

    def _decode_step(self, decoding: list[Running]) -> None:
        """One token of each of ``decoding`` (all under one adapter set), as many per llama_decode as give each
        sequence the logits it would get alone."""
        adapters = decoding[0].final.adapters
        rows = exact_decode_rows(
            parallel=self.decode_rows,
            llamafile=self._llamafile,
            repacked=False,
            float_weights=any(h.float_weights for h, _ in adapters),
        )
        self._set_adapters(adapters)
        began = time.perf_counter()
        alone = [r for r in decoding if self._float_kv and splits_kv(len(self._slots[r.slot or 0].tokens), self.n_ctx)]
        together = [r for r in decoding if r not in alone]
        groups = [[r] for r in alone] + [together[start : start + rows] for start in range(0, len(together), rows)]
        for group in groups:
            entries = []
            for running in group:
                slot = self._slots[running.slot or 0]
                entries.append((slot.seq_id, len(slot.tokens), running.pending or 0, True))
            self._decode(entries)
            self.decode_calls += 1
            for running, (_, _, token, _) in zip(group, entries):
                self._slots[running.slot or 0].tokens.append(token)
            for index, running in enumerate(group):
                self._sample(running, index)
        self.decode_steps += 1
        self.decode_step_tokens += len(decoding)
        self.last_batch_size = len(decoding)
        self.last_batch_rows = max(len(group) for group in groups)
        if self.on_decode_step is not None:
            try:
                self.on_decode_step(len(decoding), time.perf_counter() - began)
            except Exception:  # an observer never stops the generations
                log.exception("the decode step observer failed")

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One ``llama_decode`` of (sequence id, position, token, wants logits) entries."""
        batch = self._batch
        batch.n_tokens = len(entries)
        for index, (seq_id, pos, token, wants) in enumerate(entries):
            batch.token[index] = token
            batch.pos[index] = pos
            batch.n_seq_id[index] = 1
            batch.seq_id[index][0] = seq_id
            batch.logits[index] = wants
        status = llama_cpp.llama_decode(self._ctx.ctx, batch)
        if status != 0:
            raise LlamaCppError(f"decode a batch of {len(entries)} tokens (llama_decode returned {status})")

    def _sample(self, running: Running, index: int) -> None:
        """Sample ``running``'s next token from output ``index`` of the last decode and deliver its chunk."""
        if running.grammar is None:
            token = int(llama_cpp.llama_sampler_sample(running.sampler, self._ctx.ctx, index))
        else:
            sampled = self._sample_grammar(running, index)
            if sampled is None:  # stopped part-way through the vocabulary: no token of the grammar's came out
                self._end(running, running.ending())
                return
            token = sampled
        end = token == self._eos or bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))
        logprobs = (
            () if end or running.params.logprobs is None else (self._logprob(token, running.params.logprobs, index),)
        )
        piece = b"" if end else bytes(self._model.detokenize([token], special=False))
        chunk = running.accept(token, piece, end_of_generation=end, logprobs=logprobs)
        if not end:
            self.decoded_tokens += 1
        if running.finished:
            self._end(running, chunk)
        else:
            running.deliver(chunk)

    def _sample_grammar(self, running: Running, index: int) -> int | None:
        """What ``llama_sampler_sample`` gives with the grammar first in the chain, the grammar applied to the
        vocabulary GRAMMAR_SLICE tokens at a time (llama.cpp's own masks, so the same tokens); None when the
        sequence was cancelled or passed its deadline before the grammar was through."""
        candidates = np.empty(self._n_vocab, dtype=_TOKEN_DATA)
        candidates["id"] = self._token_ids
        candidates["logit"] = self._logits_row(index)
        candidates["p"] = 0.0
        for start in range(0, self._n_vocab, GRAMMAR_SLICE):
            if running.interrupted():
                self.grammar_interrupts += 1
                return None
            _apply(running.grammar, candidates[start : start + GRAMMAR_SLICE])
            self.grammar_slices += 1
        view = _apply(running.sampler, candidates)
        token = int(view.data[view.selected].id)
        llama_cpp.llama_sampler_accept(running.sampler, token)
        if not llama_cpp.llama_vocab_is_eog(self._vocab, token):  # the generation ends there: nothing to accept
            llama_cpp.llama_sampler_accept(running.grammar, token)
        return token

    def _logprob(self, token: int, alternatives: int, index: int) -> TokenLogprob:
        """From the logits ``token`` was sampled from: the model's own, before penalties, grammar and temperature."""
        return token_logprob(
            self._logits_row(index), token, alternatives, lambda t: bytes(self._model.detokenize([t], special=True))
        )


def _apply(sampler: Any, candidates: np.ndarray) -> Any:
    """``llama_sampler_apply`` over ``candidates`` (a contiguous _TOKEN_DATA array, changed in place); the array view
    it filled in (``selected``: the chosen entry, when the sampler selects)."""
    view = llama_cpp.llama_token_data_array(
        data=candidates.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)),
        size=len(candidates),
        selected=-1,
        sorted=False,
    )
    llama_cpp.llama_sampler_apply(sampler, ctypes.byref(view))
    return view


def exact_decode_rows(*, parallel: int, llamafile: bool, repacked: bool, float_weights: bool) -> int:
    """Sequences one llama_decode may decode together so that each gets the logits it gets alone (one row)."""
    if llamafile and float_weights:
        return 1
    return min(parallel, GEMV_MAX_ROWS) if repacked else parallel


def splits_kv(position: int, n_ctx: int) -> bool:
    """True when llama.cpp's CPU flash attention over a float KV cache splits the cells a lone one-token query at
    ``position`` reads (in a stream of ``n_ctx`` cells) into per-thread chunks: such a query decodes alone."""
    return min(n_ctx, -(-(position + 1) // KV_PAD) * KV_PAD) >= SPLIT_KV_CELLS


def _has_float_matrices(header: GGUFHeader) -> bool:
    """True when a weight matrix of the GGUF is f32, f16 or bf16 (norms and biases are vectors)."""
    return any(t.ggml_type in FLOAT_TYPES and sum(1 for d in t.shape if d > 1) >= 2 for t in header.tensors)


def _init_backend() -> None:
    """llama.cpp's one-time backend set-up (``Llama`` does it on its first construction)."""
    global _backend_ready
    with _backend:
        if not _backend_ready:
            set_verbose(False)  # llama.cpp's log goes to Python's logging, errors only (as Llama(verbose=False))
            with suppress_stdout_stderr(disable=False):
                llama_cpp.llama_backend_init()
            _backend_ready = True
