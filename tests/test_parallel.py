"""The threads that feed the model, and batching by token count (no model needed)."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from crashing import square_or_crash

from qvlsearch.batching import Encoded, Failed, token_batches
from qvlsearch.errors import MediaError
from qvlsearch.parallel import WorkerCrashed, WorkerProcesses, death, in_background, prefetch


def encoded(index: int, length: int) -> Encoded:
    return Encoded(index=index, input_ids=[1] * length, mm_token_type_ids=[0] * length, vision={})


def test_in_background_yields_everything_in_order_from_another_thread():
    threads = set()

    def source():
        for i in range(50):
            threads.add(threading.current_thread().name)
            yield i

    assert list(in_background(source(), depth=2)) == list(range(50))
    assert threads == {"qvlsearch-batches"}


def test_in_background_raises_the_sources_error_in_the_consumer():
    def source():
        yield 1
        raise ValueError("broken source")

    results = in_background(source(), depth=2)
    assert next(results) == 1
    with pytest.raises(ValueError, match="broken source"):
        next(results)


def test_closing_in_background_early_stops_and_closes_the_source():
    closed = threading.Event()

    def source():
        try:
            yield from range(10_000)
        finally:
            closed.set()

    results = in_background(source(), depth=2)
    assert next(results) == 0
    results.close()
    assert closed.wait(5)


def test_prefetch_keeps_input_order_with_bounded_look_ahead():
    started = []

    def slow_square(i: int, x: int) -> int:
        started.append(i)
        time.sleep(0.001 * (x % 3))
        return x * x

    results = prefetch(slow_square, range(20), workers=4, ahead=3)
    assert next(results) == 0
    assert len(started) <= 3  # no more than `ahead` items were handed to the workers
    assert [0, *results] == [x * x for x in range(20)]


def test_token_batches_respect_the_token_budget_and_pass_failures_on_at_once():
    failure = Failed(99, MediaError("bad"))
    stream = [encoded(i, n) for i, n in enumerate([30, 10, 20, 40, 10])] + [failure]
    out = list(token_batches(stream, max_tokens=60, max_items=64))
    batches = [b for b in out if isinstance(b, list)]
    assert failure in out
    assert sorted(e.index for b in batches for e in b) == [0, 1, 2, 3, 4]
    for batch in batches:
        assert max(map(len, batch)) * len(batch) <= 60
        assert [len(e) for e in batch] == sorted(len(e) for e in batch)  # sorted by length


def test_token_batches_cap_padding():
    lengths = [100, 101, 102, 150, 151, 300]
    stream = [encoded(i, n) for i, n in enumerate(lengths)]
    uncapped = list(token_batches(stream, max_tokens=10_000, max_items=64))
    assert len(uncapped) == 1  # everything fits the budget: one batch, padded to 300
    capped = list(token_batches(stream, max_tokens=10_000, max_items=64, max_padding=0.1))
    for batch in capped:
        padded, real = max(map(len, batch)) * len(batch), sum(map(len, batch))
        assert padded <= 1.1 * real
    assert [[len(e) for e in b] for b in capped] == [[100, 101, 102], [150, 151], [300]]


def crashed(index: int, item, how: str) -> tuple:
    return "crashed", index, how


def test_a_crashing_item_fails_alone_and_its_neighbours_get_their_results_in_order():
    processes = WorkerProcesses(square_or_crash, 2, crashed=crashed)
    assert processes.pool is None  # no process before the first item
    items = [1, 2, "segfault", 3, 4, 5]
    got = list(prefetch(None, items, workers=0, ahead=4, processes=processes))
    assert got == [1, 4, ("crashed", 2, "SIGSEGV"), 9, 16, 25]
    assert list(prefetch(None, [6, 7], workers=0, ahead=4, processes=processes)) == [36, 49]  # started afresh
    with pytest.raises(ValueError, match="an ordinary error"):  # not a crash: raised as it is
        list(prefetch(None, [1, "raises", 2], workers=0, ahead=4, processes=processes))

    def call(x):  # from many threads at once, as Decoders calls
        return processes.call(0, x)

    with ThreadPoolExecutor(6) as threads:
        assert list(threads.map(call, [1, 2, "segfault", 3, 4, 5])) == [1, 4, ("crashed", 0, "SIGSEGV"), 9, 16, 25]
    processes.shutdown()
    assert processes.pool is None and processes.call(0, 8) == 64  # started again after a shutdown
    processes.shutdown()


def test_without_crashed_the_culprits_call_raises_and_names_the_signal():
    processes = WorkerProcesses(square_or_crash, 1)
    assert processes.call(0, 2) == 4
    with pytest.raises(WorkerCrashed, match=r"died \(SIGABRT\)") as crash:
        processes.call(1, "abort")
    assert crash.value.how == "SIGABRT"
    assert processes.call(2, 3) == 9
    processes.shutdown()


def test_death_says_how_a_process_ended():
    assert [death(code) for code in (-11, -6, -9, 1, 0, None)] == [
        "SIGSEGV", "SIGABRT", "SIGKILL", "exit code 1", "", ""]
