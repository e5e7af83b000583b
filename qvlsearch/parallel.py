"""Feed the model from other threads: media decoding runs in worker threads or processes with
bounded look-ahead, and batches are formed in a background thread while the model runs on
the previous ones."""

from __future__ import annotations

import multiprocessing
import queue
import signal
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from typing import Any, TypeVar

from .errors import QvlsearchError

T = TypeVar("T")


def prefetch(fn: Callable[[int, Any], Any], items: Iterable[Any], workers: int, ahead: int,
             processes: WorkerProcesses | None = None) -> Iterator[Any]:
    """`fn(i, item)` for each item, results in input order, at most `ahead` in flight.

    The calls run in `processes` when given (which hold their own `fn`), else in `workers`
    threads, else inline.
    """
    if processes is not None:
        yield from _in_order(processes.submit, items, ahead)
    elif workers <= 0:
        yield from (fn(i, item) for i, item in enumerate(items))
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qvlsearch-load") as pool:
            yield from _in_order(partial(pool.submit, fn), items, ahead)


def _in_order(submit: Callable[[int, Any], Future], items: Iterable[Any], ahead: int) -> Iterator[Any]:
    pending: deque[Future] = deque()
    try:
        for i, item in enumerate(items):
            pending.append(submit(i, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        raise QvlsearchError("a media worker process died (out of memory, or a crash in a decoder); "
                             "run again to resume, with fewer --workers if memory is short") from None
    finally:
        for future in pending:
            future.cancel()


_worker_fn: Callable[[int, Any], Any] | None = None


def _start_worker(fn: Callable[[int, Any], Any]) -> None:
    global _worker_fn
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the parent handles it
    torch.set_num_threads(1)  # a process per core: more threads each would only contend
    _worker_fn = fn


def _call_worker_fn(index: int, item: Any) -> Any:
    return _worker_fn(index, item)


class WorkerProcesses:
    """A pool of spawned processes that each hold `fn` (pickled once, when they start).

    Threads share one interpreter lock with the thread that drives the GPU, and on a GPU
    machine the processor's Python work in 16 threads starves it; processes do not.
    Spawning means the usual `if __name__ == "__main__":` guard in scripts.
    """

    def __init__(self, fn: Callable[[int, Any], Any], workers: int):
        self.fn, self.workers = fn, max(1, workers)
        self.pool = self.start()

    def start(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_start_worker, initargs=(self.fn,))

    def submit(self, index: int, item: Any) -> Future:
        try:
            return self.pool.submit(_call_worker_fn, index, item)
        except BrokenProcessPool:  # a worker died during an earlier call, which reported it: start afresh
            self.pool = self.start()
            return self.pool.submit(_call_worker_fn, index, item)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


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
