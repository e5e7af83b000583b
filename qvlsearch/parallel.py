"""Feed the model from other threads: media decoding runs in worker threads or processes with
bounded look-ahead, and batches are formed in a background thread while the model runs on
the previous ones."""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from typing import Any, TypeVar

from .errors import QvlsearchError

log = logging.getLogger("qvlsearch")
T = TypeVar("T")


def prefetch(fn: Callable[[int, Any], Any], items: Iterable[Any], workers: int, ahead: int,
             processes: WorkerProcesses | None = None) -> Iterator[Any]:
    """`fn(i, item)` for each item, results in input order, at most `ahead` in flight.

    The calls run in `processes` when given (which hold their own `fn`; an item whose process
    died is tried again alone, see `WorkerProcesses.alone`), else in `workers` threads, else inline.
    """
    if processes is not None:
        yield from _in_order(processes.submit, items, ahead, processes.alone)
    elif workers <= 0:
        yield from (fn(i, item) for i, item in enumerate(items))
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qvlsearch-load") as pool:
            yield from _in_order(partial(pool.submit, fn), items, ahead)


def _in_order(submit: Callable[[int, Any], Future], items: Iterable[Any], ahead: int,
              alone: Callable[[int, Any], Any] | None = None) -> Iterator[Any]:
    pending: deque[tuple[int, Any, Future]] = deque()

    def result(i: int, item: Any, future: Future) -> Any:
        try:
            return future.result()
        except BrokenProcessPool:  # its process, or a neighbour's, died: try it again on its own
            if alone is None:
                raise
            return alone(i, item)

    try:
        for i, item in enumerate(items):
            pending.append((i, item, submit(i, item)))
            if len(pending) >= ahead:
                yield result(*pending.popleft())
        while pending:
            yield result(*pending.popleft())
    finally:
        for _, _, future in pending:
            future.cancel()


_worker_fn: Callable[[int, Any], Any] | None = None


def _start_worker(fn: Callable[[int, Any], Any]) -> None:
    global _worker_fn
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the parent handles it
    # A process per core: more threads each would only contend. Torch reads the variable if it is imported later.
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    _worker_fn = fn


def _call_worker_fn(index: int, item: Any) -> Any:
    return _worker_fn(index, item)


def apply(index: int, call: tuple[Callable[..., Any], tuple]) -> Any:
    """A worker `fn` for pools that run assorted module-level functions: `call` is (function, args)."""
    function, args = call
    return function(*args)


class WorkerCrashed(QvlsearchError):
    """A worker process died while it ran one item alone: that item crashed it."""

    def __init__(self, how: str):
        super().__init__(f"a worker process died{f' ({how})' if how else ''} while it ran one item alone")
        self.how = how  # "SIGSEGV", "exit code 1", or "" when unknown


def death(exitcode: int | None) -> str:
    """How a process ended, in words: "SIGSEGV" for -11, "exit code 1", "" when unknown."""
    if exitcode is None or exitcode == 0:
        return ""
    if exitcode < 0:
        try:
            return signal.Signals(-exitcode).name
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


def exit_code(process: multiprocessing.process.BaseProcess, timeout: float = 30) -> int | None:
    """The exit code of a process that has died, waited for.

    A core dump can hold the exit status back a while, and the pool's own thread reaps the
    process too: when it wins, our wait finds no child and the code appears only once that
    thread has stored it. So wait until the code is there, not just until the process is gone.
    """
    deadline = time.monotonic() + timeout
    while process.exitcode is None and time.monotonic() < deadline:
        process.join(timeout=0.05)
    return process.exitcode


class WorkerProcesses:
    """A pool of spawned processes that each hold `fn` (pickled once, when they start).

    Threads share one interpreter lock with the thread that drives the GPU, and on a GPU
    machine the processor's Python work in 16 threads starves it; processes do not. A process
    also walls off a decoder that crashes (a segfault in FFmpeg, pdfium or an image library):
    when one dies, every item in flight fails with it, so each of those is tried again alone,
    in a process of its own, once; an item that kills that process too is the culprit, and
    `crashed(index, item, how)` is its result. Processes start when the first item comes (and
    only as many as items in flight need). Spawning means the usual
    `if __name__ == "__main__":` guard in scripts.
    """

    def __init__(self, fn: Callable[[int, Any], Any], workers: int,
                 crashed: Callable[[int, Any, str], Any] | None = None):
        self.fn, self.workers = fn, max(1, workers)
        self.crashed = crashed
        self.pool: ProcessPoolExecutor | None = None
        self.lone: ProcessPoolExecutor | None = None  # one process, one item at a time: see `alone`
        self.lock, self.lone_lock = threading.Lock(), threading.Lock()  # `call` may come from many threads

    def start(self, workers: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_start_worker, initargs=(self.fn,))

    def submit(self, index: int, item: Any) -> Future:
        with self.lock:
            if self.pool is None:
                self.pool = self.start(self.workers)
            try:
                return self.pool.submit(_call_worker_fn, index, item)
            except BrokenProcessPool:  # a worker died during an earlier call, which reported it: start afresh
                self.pool = self.start(self.workers)
                return self.pool.submit(_call_worker_fn, index, item)

    def call(self, index: int, item: Any) -> Any:
        """`fn(index, item)` in a worker, waited for (from any thread); a crash is handled as in `alone`."""
        try:
            return self.submit(index, item).result()
        except BrokenProcessPool:
            return self.alone(index, item)

    def alone(self, index: int, item: Any) -> Any:
        """`fn(index, item)` in a process of its own, with no other item: its result, or, if the process
        dies, `crashed(index, item, how)` (or WorkerCrashed raised, without `crashed`)."""
        with self.lone_lock:  # one item at a time
            if self.lone is None:
                self.lone = self.start(1)
            pool = self.lone
            future = pool.submit(_call_worker_fn, index, item)
            # The pool keeps its process private, and with it how the process ended (the signal).
            processes = list((getattr(pool, "_processes", None) or {}).values())
            try:
                return future.result()
            except BrokenProcessPool:
                self.lone = None  # started afresh for the next one
                processes = processes or list((getattr(pool, "_processes", None) or {}).values())
                codes = [exit_code(process) for process in processes]
        if 0 in codes:  # it ended as if in good order: its start failed (the log says why), not the item
            raise QvlsearchError("a worker process could not start (see the messages above)")
        how = next((death(code) for code in codes if death(code)), "")
        log.info("item %d crashed its worker process%s", index, f" ({how})" if how else "")
        if self.crashed is None:
            raise WorkerCrashed(how)
        return self.crashed(index, item, how)

    def shutdown(self) -> None:
        """Stop the processes; the next item starts new ones."""
        with self.lock, self.lone_lock:
            pools, self.pool, self.lone = (self.pool, self.lone), None, None
        for pool in pools:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)


class _End:
    """What the background thread sends last: nothing, or the error that stopped it."""

    def __init__(self, error: BaseException | None = None):
        self.error = error


def in_background(source: Iterator[T], depth: int) -> Iterator[T]:
    """Run `source` in a thread, at most `depth` results ahead of the consumer.

    Errors raised by `source` are raised here; closing this generator stops the thread.
    """
    results: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(value: Any) -> bool:
        while not stop.is_set():
            try:
                results.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for value in source:
                if not put(value):
                    break
        except BaseException as exc:  # handed to the consumer, which raises it
            put(_End(exc))
            return
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()
        put(_End())

    thread = threading.Thread(target=run, name="qvlsearch-batches", daemon=True)
    thread.start()
    try:
        while True:
            value = results.get()
            if isinstance(value, _End):
                if value.error is not None:
                    raise value.error
                return
            yield value
    finally:
        stop.set()
        # Wait (boundedly) for it to stop: a daemon thread still inside torch when the
        # interpreter exits (after Ctrl-C) aborts the process.
        thread.join(timeout=30)
