"""A worker function for tests/test_parallel.py, in a module of its own so that worker processes start
quickly (it imports nothing heavy): its "decoder" crashes on marked inputs, as FFmpeg might on a hostile file."""

import os
import signal


def square_or_crash(index: int, x):
    if x == "segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    if x == "abort":
        os.abort()
    if x == "raises":
        raise ValueError("an ordinary error")
    return x * x
