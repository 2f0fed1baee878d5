"""Memory plan in bytes — process, base model, KV cache, compute buffers, adapters — and measured RSS.

The terms are computed from the base GGUF's header and the context settings, and were checked against the RSS of
a running runtime (``tests/runtime/test_budget.py`` holds the plan to within 10% of it):

- process: the daemon's Python runtime — CPython with llama.cpp, aiohttp, cryptography and prometheus_client
  imported (measured: 72 MiB on x86-64 CPython 3.11) — plus llama.cpp's tokenizer tables (counted: 180 bytes
  per vocabulary entry and 210 per BPE merge rule; measured 373 bytes per entry for SmolLM2's BPE with its merges,
  173 for Gemma's SentencePiece vocabulary) plus 8 MiB of headroom for what varies between runs (allocator arenas
  of the decode threads, load transients: peaks up to 6 MiB above the steady state were measured).
- base model: the GGUF's tensor bytes. They are memory-mapped; every page is touched by the first decode. Tensors
  of the types llama.cpp's CPU kernels repack (Q4_0, Q4_K, IQ4_NL) are counted twice: the repacked copy is held
  beside the mapped pages it was made from (12.7 MiB for Gemma 3 270M Q4_K_M).
- KV cache: ctx × layers × (K width + V width) × bytes per element of the KV type (llama.cpp's own formula). It
  holds for sliding-window models too (gemma2/gemma3): llama-cpp-python 0.3.36 creates contexts with llama.cpp's
  default ``swa_full = true``, so the sliding-window layers' cache has ctx cells like the global layers' (not the
  window plus a micro-batch); ``tests/runtime/test_budget_gemma.py`` checks it against llama.cpp's own sizes.
- parallel sequences: each of the ``parallel`` sequences the engine decodes together has its own KV stream of ctx
  cells (so the KV term is parallel × ctx), its own row of output logits (vocabulary × 4 bytes) and its own
  sampler chain; ``auto`` picks the most sequences (4, 2 or 1) whose extra KV streams take at most a quarter of
  what one sequence's plan leaves for adapters.
- compute: llama.cpp reserves ubatch × vocab × 4 bytes for logits, but with one output per decode only the
  activations are ever touched: measured ubatch × 16 × (n_embd + n_ff) bytes, and 12 more per unit once a prompt
  batch runs with an adapter applied (its low-rank products and scaled outputs: measured +6.5 MiB on SmolLM2 and
  +5 to +11 MiB on Gemma 3 270M at ubatch 256); plus the f16 attention mask
  (ctx × ubatch × 2 bytes, filled for every prompt micro-batch) and, per vocabulary entry, the logits row
  llama.cpp outputs and the two candidate arrays the samplers fill (4 + 12 + 12 bytes): 7 MiB for Gemma's 262k
  vocabulary, measured 5.8.
- request buffers: HTTP request bodies being read, parsed and tokenized before they reach the queue. At most
  ``request_reads`` requests do that at once (the daemon's intake holds them to it), each with a body of up to the
  body cap, counted three times over (measured peak: twice): the bytes received, the text Python decodes them into
  and the strings JSON parsing makes of it. Text outside Latin-1 takes 2-4 bytes per character in Python, so such
  bodies can need more. Every other open connection (at most ``max_connections``; by default ``max_queue`` waiting
  for a read slot, the readers and 4 spare) may hold what its client pushed before aiohttp paused reading it: one
  256 KiB socket read plus twice aiohttp's 64 KiB read buffer. Beyond that, connections get 503 at once.
- adapters: what remains of the runtime budget.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gguf
import psutil

from edge_runtime.errors import BaseDoesNotFit, InvalidGGUF
from edge_runtime.gguf import keys
from edge_runtime.gguf.header import GGUFHeader, read_header

log = logging.getLogger(__name__)

MIB = 1 << 20
PROCESS_BASELINE_BYTES = 72 * MIB
PEAK_HEADROOM_BYTES = 8 * MIB
TOKENIZER_BYTES_PER_TOKEN = 180
TOKENIZER_BYTES_PER_MERGE = 210
# llama.cpp's CPU backend copies tensors of these types into an interleaved layout for its AVX2/NEON kernels
# ("CPU_REPACK" buffer), beside the mapped file whose pages it read to do so.
REPACKED_TYPES = frozenset(
    {gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.IQ4_NL}
)
COMPUTE_BYTES_PER_UBATCH_UNIT = 16
LORA_BYTES_PER_UBATCH_UNIT = 12  # the low-rank products and scaled outputs an applied adapter adds to the graph
KQ_MASK_BYTES_PER_ELEMENT = 2  # f16 (flash attention)
LOGITS_BYTES_PER_TOKEN = 4 + 12 + 12  # one float32 logit, two llama_token_data candidates
MAX_UBATCH = 512
AUTO_PARALLEL_CHOICES = (4, 2, 1)
AUTO_PARALLEL_SHARE = 4  # extra sequences may take 1/4 of what one sequence's plan leaves for adapters
SEQUENCE_BYTES_PER_TOKEN = 4 + 8  # a sequence's output logits row and its sampler chain's per-token state
DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_QUEUE = 16
REQUEST_BUFFER_COPIES = 3  # received bytes, decoded text, parsed strings
MAX_REQUEST_READS = 2
SPARE_CONNECTIONS = 4  # beyond readers and waiting requests: health checks, metrics, the status page
READ_BUFFER_BYTES = 64 * 1024  # aiohttp's per-connection read buffer (the daemon sets it explicitly)
CONNECTION_BUFFER_BYTES = 256 * 1024 + 2 * READ_BUFFER_BYTES  # asyncio's recv size + aiohttp's high-water mark
# glibc: allocations from this size up get their own mmap, so freeing them returns the pages to the OS at once.
_MMAP_THRESHOLD_BYTES = 256 * 1024
_M_MMAP_THRESHOLD = -3


@dataclass(frozen=True)
class ModelShape:
    """The hyper-parameters of a base model that decide its memory use."""

    architecture: str
    n_layers: int
    n_embd: int
    n_ff: int
    n_vocab: int
    kv_width: int  # K plus V values per token per layer
    tensor_bytes: int
    context_length: int
    n_merges: int = 0  # BPE merge rules in the tokenizer
    repacked_bytes: int = 0  # tensor bytes llama.cpp's CPU backend holds a second, repacked copy of

    @property
    def resident_bytes(self) -> int:
        """Bytes the loaded model holds: its mapped tensors plus the repacked copies."""
        return self.tensor_bytes + self.repacked_bytes

    @classmethod
    def from_header(cls, header: GGUFHeader) -> ModelShape:
        """Read the shape from a base model's GGUF header."""
        arch = str(header.value(keys.ARCHITECTURE, ""))

        def number(key: str, default: int | None = None) -> int:
            value = header.value(f"{arch}.{key}", default)
            if value is None:
                raise InvalidGGUF(str(header.path), f"metadata key {arch}.{key} is missing")
            return int(max(value) if isinstance(value, list) else value)

        n_head = number("attention.head_count")
        n_embd = number("embedding_length")
        head_k = number("attention.key_length", n_embd // n_head)
        head_v = number("attention.value_length", n_embd // n_head)
        n_head_kv = number("attention.head_count_kv", n_head)
        vocab, merges = header.fields.get(keys.TOKENS), header.fields.get(keys.MERGES)
        return cls(
            architecture=arch,
            n_layers=number("block_count"),
            n_embd=n_embd,
            n_ff=number("feed_forward_length"),
            n_vocab=vocab.count if vocab else number("vocab_size"),
            kv_width=n_head_kv * (head_k + head_v),
            tensor_bytes=sum(t.n_bytes for t in header.tensors),
            context_length=number("context_length", 0),
            n_merges=merges.count if merges else 0,
            repacked_bytes=sum(t.n_bytes for t in header.tensors if t.ggml_type in REPACKED_TYPES),
        )


def model_shape(path: Path | str) -> ModelShape:
    """The memory-relevant shape of the base model at ``path``."""
    return ModelShape.from_header(read_header(path))


def kv_cache_bytes(shape: ModelShape, ctx: int, kv_type: str) -> int:
    """Bytes of the KV cache for ``ctx`` tokens: ctx × layers × (K+V width) × bytes of ``kv_type``.

    Sliding-window layers count ctx cells too: llama.cpp's default full-size SWA cache (``swa_full``).
    """
    block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kv_type.upper()]]
    return ctx * shape.n_layers * shape.kv_width * type_size // block_size


def ubatch_for(batch: int) -> int:
    """The micro-batch llama.cpp computes at once for a prompt batch of ``batch`` tokens."""
    return max(1, min(batch, MAX_UBATCH))


def compute_bytes(shape: ModelShape, batch: int, ctx: int = 0) -> int:
    """Resident bytes of llama.cpp's compute buffers for a prompt batch of ``batch`` tokens in a ``ctx``-token
    context: activations (with an adapter applied), the attention mask, the output logits and the samplers'
    candidates."""
    ubatch = ubatch_for(batch)
    activations = ubatch * (COMPUTE_BYTES_PER_UBATCH_UNIT + LORA_BYTES_PER_UBATCH_UNIT) * (shape.n_embd + shape.n_ff)
    return activations + ctx * ubatch * KQ_MASK_BYTES_PER_ELEMENT + shape.n_vocab * LOGITS_BYTES_PER_TOKEN


def request_reads(threads: int) -> int:
    """How many requests may be read, parsed and tokenized at once on a device with ``threads`` CPU threads."""
    return max(1, min(threads, MAX_REQUEST_READS))


@dataclass(frozen=True)
class RequestLimits:
    """The daemon's limits on requests that decide their memory: body cap and requests waiting (bytes, count)."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_queue: int = DEFAULT_MAX_QUEUE
    max_connections: int | None = None  # None: max_queue + MAX_REQUEST_READS + SPARE_CONNECTIONS

    @property
    def connections(self) -> int:
        """Open connections the daemon allows at once."""
        return self.max_connections or self.max_queue + MAX_REQUEST_READS + SPARE_CONNECTIONS


DEFAULT_REQUEST_LIMITS = RequestLimits()


def request_buffer_bytes(limits: RequestLimits, reads: int) -> int:
    """Peak bytes of ``reads`` bodies being read and parsed at once plus what every other connection may buffer."""
    others = max(0, limits.connections - reads)
    return reads * limits.max_body_bytes * REQUEST_BUFFER_COPIES + others * CONNECTION_BUFFER_BYTES


def process_bytes(shape: ModelShape) -> int:
    """Bytes of the Python runtime with llama.cpp and the model's tokenizer tables loaded."""
    return (
        PROCESS_BASELINE_BYTES
        + PEAK_HEADROOM_BYTES
        + shape.n_vocab * TOKENIZER_BYTES_PER_TOKEN
        + shape.n_merges * TOKENIZER_BYTES_PER_MERGE
    )


@dataclass(frozen=True)
class MemoryPlan:
    """Where a runtime budget goes, in bytes; ``adapter_budget_bytes`` is what remains for adapters."""

    budget_bytes: int
    process_bytes: int
    model_bytes: int
    kv_cache_bytes: int
    compute_bytes: int
    request_buffer_bytes: int
    ctx: int
    batch: int
    kv_type: str
    parallel: int
    max_body_bytes: int
    max_queue: int
    request_reads: int
    max_connections: int

    @property
    def fixed_bytes(self) -> int:
        """Everything but adapters."""
        return (
            self.process_bytes + self.model_bytes + self.kv_cache_bytes + self.compute_bytes + self.request_buffer_bytes
        )

    @property
    def adapter_budget_bytes(self) -> int:
        """What the budget leaves for resident adapters (negative when the base does not fit)."""
        return self.budget_bytes - self.fixed_bytes

    @property
    def fits(self) -> bool:
        """True when the base model, its KV cache and buffers fit in the budget."""
        return self.adapter_budget_bytes >= 0

    def require_fit(self, profile: str) -> None:
        """Raise ``BaseDoesNotFit`` with the terms when the base model does not fit."""
        if not self.fits:
            raise BaseDoesNotFit(
                needed_bytes=self.fixed_bytes,
                budget_bytes=self.budget_bytes,
                kv_cache_bytes=self.kv_cache_bytes,
                profile=profile,
                parallel=self.parallel,
            )

    def adapters_that_fit(self, adapter_bytes: int) -> int:
        """How many adapters of ``adapter_bytes`` each can be resident at once."""
        if adapter_bytes <= 0 or not self.fits:
            return 0
        return self.adapter_budget_bytes // adapter_bytes

    def as_dict(self) -> dict[str, int | str]:
        """The plan as plain values (bytes), with the derived totals."""
        kv_tokens = f"{self.parallel} x {self.ctx}" if self.parallel > 1 else str(self.ctx)
        return asdict(self) | {
            "fixed_bytes": self.fixed_bytes,
            "adapter_budget_bytes": self.adapter_budget_bytes,
            "kv_tokens": kv_tokens,
        }


@dataclass(frozen=True)
class MemoryTerm:
    """One fixed term of the memory plan, as every view shows it (``edge-rt plan``, ``edge-rt status``, the page)."""

    key: str  # its bytes: MemoryPlan.as_dict()[key]
    label: str  # short, for the status page's bar
    detail: str  # with the plan's own numbers: formatted with MemoryPlan.as_dict() and max_body_kib

    def describe(self, plan: dict[str, Any]) -> str:
        """The term's label with ``plan``'s numbers (a ``MemoryPlan.as_dict()``; the short label when the plan, e.g.
        an older daemon's, lacks a number it names)."""
        try:
            return self.detail.format(**plan, max_body_kib=int(plan["max_body_bytes"]) // 1024)
        except (KeyError, ValueError, TypeError):
            return self.label


MEMORY_TERMS = (
    MemoryTerm("process_bytes", "process", "process (Python, llama.cpp, tokenizer)"),
    MemoryTerm("model_bytes", "base model", "base model"),
    MemoryTerm("kv_cache_bytes", "KV cache", "KV cache ({kv_tokens} tokens, {kv_type})"),
    MemoryTerm("compute_bytes", "compute", "compute buffers (batch {batch})"),
    MemoryTerm(
        "request_buffer_bytes",
        "request buffers",
        "request buffers ({request_reads} x {max_body_kib} KiB, {max_connections} connections)",
    ),
)


def plan_memory(
    shape: ModelShape,
    *,
    budget_bytes: int,
    ctx: int,
    batch: int,
    kv_type: str,
    requests: RequestLimits = DEFAULT_REQUEST_LIMITS,
    reads: int = MAX_REQUEST_READS,
    parallel: int = 1,
) -> MemoryPlan:
    """Split ``budget_bytes`` into the runtime's fixed terms and the adapter budget (``ctx`` tokens of KV for each
    of ``parallel`` sequences)."""
    return MemoryPlan(
        budget_bytes=budget_bytes,
        process_bytes=process_bytes(shape),
        model_bytes=shape.resident_bytes,
        kv_cache_bytes=kv_cache_bytes(shape, ctx * parallel, kv_type),
        compute_bytes=compute_bytes(shape, batch, ctx) + sequence_bytes(shape, parallel),
        request_buffer_bytes=request_buffer_bytes(requests, reads),
        ctx=ctx,
        batch=batch,
        kv_type=kv_type,
        parallel=parallel,
        max_body_bytes=requests.max_body_bytes,
        max_queue=requests.max_queue,
        request_reads=reads,
        max_connections=requests.connections,
    )


def sequence_bytes(shape: ModelShape, parallel: int) -> int:
    """Bytes each sequence beyond the first adds outside its KV stream: its logits row and its sampler chain."""
    return (parallel - 1) * shape.n_vocab * SEQUENCE_BYTES_PER_TOKEN


def auto_parallel(shape: ModelShape, *, budget_bytes: int, ctx: int, kv_type: str) -> int:
    """Sequences to decode together when a profile says ``auto``: the most of 4, 2, 1 whose extra KV streams (and
    logits rows) take at most a quarter of what one sequence's plan leaves for adapters."""
    single = plan_memory(shape, budget_bytes=budget_bytes, ctx=ctx, batch=MAX_UBATCH, kv_type=kv_type)
    room = max(0, single.adapter_budget_bytes) // AUTO_PARALLEL_SHARE
    for parallel in AUTO_PARALLEL_CHOICES:
        extra = (parallel - 1) * kv_cache_bytes(shape, ctx, kv_type) + sequence_bytes(shape, parallel)
        if extra <= room:
            return parallel
    return 1


def adapter_resident_bytes(path: Path | str) -> int:
    """Bytes an adapter occupies once loaded: its tensor bytes (llama.cpp copies them into one buffer)."""
    return sum(t.n_bytes for t in read_header(path).tensors)


def measured_rss_bytes() -> int:
    """This process's resident set size, in bytes, as the OS reports it."""
    return int(psutil.Process().memory_info().rss)


class PeakRssSampler(threading.Thread):
    """Records the peak RSS of process ``pid`` (default: this one) every ``interval_s`` seconds until stopped."""

    def __init__(self, pid: int | None = None, *, interval_s: float = 0.005) -> None:
        super().__init__(daemon=True, name="edge-rt-rss-sampler")
        self.interval_s = interval_s
        self.process = psutil.Process(pid)
        self.peak_bytes = int(self.process.memory_info().rss)
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            try:
                self.peak_bytes = max(self.peak_bytes, int(self.process.memory_info().rss))
            except psutil.Error:  # the process ended
                return
            self.samples += 1

    def reset(self) -> int:
        """Start a new measurement from the current RSS; return the peak so far."""
        peak, self.peak_bytes = self.peak_bytes, int(self.process.memory_info().rss)
        return peak

    def stop(self) -> int:
        """Stop sampling and return the peak in bytes."""
        self._stop_event.set()
        self.join()
        return self.peak_bytes


def configure_allocator() -> bool:
    """Make freed adapter buffers leave the process (glibc only); return True when applied.

    glibc raises its mmap threshold to the size of the last freed mmapped block, so the second adapter of a size
    lands on the heap, where freeing it returns nothing to the OS. A fixed threshold keeps large blocks mmapped.
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES))


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``); a no-op elsewhere."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


@functools.cache  # find_library runs `/sbin/ldconfig -p`: a fork of the whole daemon on every trim, uncached
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None
