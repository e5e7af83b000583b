"""Feed the model from other threads: media decoding runs in workers with bounded look-ahead,
and batches are formed in a background thread while the model runs on the previous ones."""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


def prefetch(fn: Callable[[int, Any], Any], items: Iterable[Any], workers: int, ahead: int) -> Iterator[Any]:
    """`fn(i, item)` for each item in worker threads, results in input order, at most `ahead` in flight."""
    if workers <= 0:
        yield from (fn(i, item) for i, item in enumerate(items))
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qvlsearch-load") as pool:
        pending: deque = deque()
        try:
            for i, item in enumerate(items):
                pending.append(pool.submit(fn, i, item))
                if len(pending) >= ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


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
