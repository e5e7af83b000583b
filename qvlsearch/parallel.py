"""Run a function over a stream in worker threads, results in order, with bounded look-ahead."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any


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
