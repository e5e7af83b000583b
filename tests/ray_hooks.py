"""Faults that tests/test_ray.py makes happen inside Ray workers (a Ray `worker_process_setup_hook`).

In a Ray worker process, and only there:
- the model replica ends its own process (`os._exit`) in the middle of a batch when the file named by
  $QVLSEARCH_TEST_CRASH_ONCE exists, after removing it: one replica dies once;
- decoding a file whose name contains "poison" ends the process every time, as a crashing decoder would.
"""

from __future__ import annotations

import os


def in_ray_worker() -> bool:
    import ray

    return ray._private.worker.global_worker.mode == ray.WORKER_MODE


def crash_when_told() -> None:
    from qvlsearch import embedder

    vectors, load_media = embedder.Embedder.vectors, embedder.load_media

    def vectors_or_crash(self, batch, **kwargs):
        marker = os.environ.get("QVLSEARCH_TEST_CRASH_ONCE")
        if marker and in_ray_worker():
            try:
                os.remove(marker)  # only one process wins this
            except FileNotFoundError:
                pass
            else:
                os._exit(1)
        return vectors(self, batch, **kwargs)

    def load_media_or_crash(parts):
        if in_ray_worker() and any("poison" in str(value) for part in parts for value in part.values()):
            os._exit(1)
        return load_media(parts)

    embedder.Embedder.vectors = vectors_or_crash
    embedder.load_media = load_media_or_crash
