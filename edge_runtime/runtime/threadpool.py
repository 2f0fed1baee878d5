"""ggml's own CPU thread pool, attached to a llama.cpp context (builds made with ``-DGGML_OPENMP=OFF``).

llama-cpp-python 0.3.36 does not bind ``ggml_threadpool_new`` or ``llama_attach_threadpool``, so this module
calls them through ctypes in the same shared libraries llama-cpp-python loaded. Without an attached pool an
OpenMP-off build creates and joins a fresh set of threads for every graph, that is for every decoded token.

The pool's workers wait for the next graph by polling for a while (``poll``: 0 = sleep at once on a condition
variable, 50 = llama.cpp's default, 100 = poll hardest) and meet at every graph node at a barrier that spins.
``prio`` above 0 makes them SCHED_FIFO real-time threads, which take a core from everything else on the device.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

__all__ = ["ThreadPool"]

_MAX_THREADS = 512  # GGML_MAX_N_THREADS: the length of the params' cpumask


class _Params(ctypes.Structure):
    """``struct ggml_threadpool_params`` (ggml.h)."""

    _fields_ = [
        ("cpumask", ctypes.c_bool * _MAX_THREADS),
        ("n_threads", ctypes.c_int),
        ("prio", ctypes.c_int),
        ("poll", ctypes.c_uint32),
        ("strict_cpu", ctypes.c_bool),
        ("paused", ctypes.c_bool),
    ]


class ThreadPool:
    """One ggml thread pool of ``threads`` workers attached to a context; free it after the context is freed."""

    def __init__(self, llama_library: Any, context: Any, *, threads: int, poll: int, prio: int) -> None:
        cpu = ctypes.CDLL(str(_sibling(llama_library, "ggml-cpu")))
        self._free_pool = cpu.ggml_threadpool_free
        self._free_pool.argtypes, self._free_pool.restype = [ctypes.c_void_p], None
        init = cpu.ggml_threadpool_params_init
        init.argtypes, init.restype = [ctypes.POINTER(_Params), ctypes.c_int], None
        new = cpu.ggml_threadpool_new
        new.argtypes, new.restype = [ctypes.POINTER(_Params)], ctypes.c_void_p
        params = _Params()
        init(ctypes.byref(params), threads)
        params.poll, params.prio = poll, prio
        self.pointer = new(ctypes.byref(params))
        if not self.pointer:
            raise RuntimeError(f"ggml_threadpool_new failed for {threads} threads")
        attach = llama_library.llama_attach_threadpool
        attach.argtypes, attach.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p], None
        attach(context, self.pointer, self.pointer)
        self.threads, self.poll, self.prio = threads, poll, prio

    @classmethod
    def unless_openmp(cls, llama_cpp: Any, context: Any, threads: int, poll: int, prio: int) -> ThreadPool | None:
        """A pool attached to ``context`` when the build has no OpenMP (else None: libgomp runs the threads)."""
        if b"OPENMP = 1" in llama_cpp.llama_print_system_info():
            return None
        return cls(llama_cpp.llama_cpp._lib, context, threads=threads, poll=poll, prio=prio)

    def free(self) -> None:
        """Stop and join the workers (the context using the pool must be freed or detached first)."""
        if self.pointer:
            self._free_pool(self.pointer)
            self.pointer = None


def _sibling(library: Any, name: str) -> Path:
    """The shared library ``name`` beside ``library`` (libggml-cpu.so beside libllama.so)."""
    folder = Path(library._name).parent
    for candidate in (f"lib{name}.so", f"lib{name}.dylib", f"{name}.dll"):
        if (folder / candidate).exists():
            return folder / candidate
    raise FileNotFoundError(f"no {name} library beside {library._name}")
