"""Embedding on a Ray cluster: the `Embedder`'s work, spread over Ray Data, for `qvlsearch index --ray`.

`RayEmbedder.embed_iter` takes the same items and yields the same `Embedding`s as
`Embedder.embed_iter`, so the `Indexer` walks, hashes, diffs and commits on the driver
exactly as without Ray. Items stream to the cluster through a queue as the indexer finds
them; CPU actors turn them into model inputs (`ItemEncoder`), a pool of model replicas
(one per GPU, or `workers` on CPUs) embeds them, and float16 vectors come back as they
finish, each with its index (Ray does not keep order). A replica that dies is restarted and
its batch tried again; items whose worker died on every try are tried once more each on
their own, one task per actor at a time, and after that are that file's error.
"""

from __future__ import annotations

import logging
import pickle
import threading
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np

from .batching import Failed
from .embedder import Embedding, ItemEncoder
from .errors import MediaError, QvlsearchError
from .media import VisionOptions

log = logging.getLogger("qvlsearch")

PIP_LINE = "pip install 'qvlsearch[ray]'"
CHUNK_ITEMS = 32  # items per block sent to the cluster: small, so that the first results come back early
QUEUED_CHUNKS = 16  # blocks waiting in the queue: bounds the driver's look-ahead
ENCODE_BATCH = 4  # items per call of an encoding actor
TASK_RETRIES = 2  # a batch whose actor died is tried this many more times on the restarted actor
ROUNDS = 2  # passes over the items; the second tries each lost item alone
BLOCK_BYTES = 4096  # Ray Data's target block size for these datasets (see `stages`)
END = None  # the feeder's last message in the queue


class RayMissing(QvlsearchError):
    """`--ray` asked for, but Ray Data is not installed."""


def require_ray() -> None:
    """Raise a one-line error with the pip line when Ray Data cannot be imported."""
    try:
        import ray.data  # noqa: F401
    except ImportError:
        raise RayMissing(f"--ray needs Ray Data, which is not installed; run: {PIP_LINE}") from None


def quiet_ray() -> None:
    """Keep Ray Data's progress logs and warnings off stderr (they stay in the Ray session's log files)."""
    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ != "SessionFileHandler":
            handler.setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", module=r"ray(\.|$)")


@dataclass
class ModelSettings:
    """What a worker needs to build the same `ItemEncoder` and `Embedder` as the local pipeline."""

    model: str
    device: str | None
    options: VisionOptions
    torch_threads: int | None  # CPU replicas share the machine's cores
    compile: str | None = None  # torch.compile mode of the replicas' model layers


class EncodeItems:
    """Ray Data stage on CPU actors: pickled items to pickled `Encoded` inputs (model-ready tensors)."""

    def __init__(self, settings: ModelSettings, dtype_name: str):
        import torch
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(settings.model)
        self.encode = ItemEncoder(processor, settings.options, max_length=8192,
                                  default_instruction="Represent the user's input.", dtype=getattr(torch, dtype_name))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        encoded, errors = [], []
        for index, item in zip(batch["index"], batch["item"], strict=True):
            result = self.encode(int(index), pickle.loads(item))
            if isinstance(result, Failed):
                encoded.append(b"")
                errors.append(getattr(result.error, "reason", str(result.error)))
            else:
                encoded.append(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
                errors.append("")
        return {"index": batch["index"], "encoded": np.array(encoded, dtype=object),
                "error": np.array(errors, dtype=object)}


class EmbedEncoded:
    """Ray Data stage on the model replicas: `Encoded` inputs to float16 vectors, in token batches."""

    def __init__(self, settings: ModelSettings, batch_size: int | None):
        import torch

        from .embedder import Embedder

        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        o = settings.options
        self.embedder = Embedder(settings.model, device=settings.device, min_pixels=o.min_pixels,
                                 max_pixels=o.max_pixels, total_pixels=o.total_pixels, fps=o.fps,
                                 max_frames=o.max_frames, workers=0, compile=settings.compile)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One row out per batch: its results packed together, so the driver gets few, whole blocks."""
        n = len(batch["index"])
        vectors = np.zeros((n, self.embedder.dim), dtype=np.float16)
        facts: list[dict] = [{}] * n
        row_of = {int(index): row for row, index in enumerate(batch["index"])}
        ready = [pickle.loads(e) for e, error in zip(batch["encoded"], batch["error"], strict=True) if not error]
        for group in self.embedder.token_batches(ready, self.batch_size):
            out = self.embedder.vectors(self.embedder.collate(group), dim=None, normalize=True)
            for e, vector in zip(group, out, strict=True):
                vectors[row_of[e.index]] = vector
                facts[row_of[e.index]] = e.facts
        results = Results(batch["index"].astype(np.int64), vectors, facts, [str(e) for e in batch["error"]])
        return {"results": np.array([pickle.dumps(results, protocol=pickle.HIGHEST_PROTOCOL)], dtype=object)}


@dataclass
class Results:
    """A replica's answer for one batch: vectors (float16) and facts, or each item's error ("" when none)."""

    indexes: np.ndarray
    vectors: np.ndarray
    facts: list[dict]
    errors: list[str]


def queue_datasource(queue: Any) -> Any:
    """A Ray Data source of one read task that yields blocks of (index, item) rows from `queue`."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class QueueDatasource(Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[ReadTask]:
            meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
            return [ReadTask(lambda: read_queue(queue), meta)]

    return QueueDatasource()


def read_queue(queue: Any) -> Iterator[Any]:
    import pyarrow as pa

    while (chunk := queue.get(block=True)) is not END:
        yield pa.table({"index": pa.array([i for i, _ in chunk], pa.int64()),
                        "item": pa.array([item for _, item in chunk], pa.binary())})


class RayEmbedder:
    """`Embedder.embed_iter` on a Ray cluster: same items in, same `Embedding`s out."""

    def __init__(self, model: str, *, address: str | None = None, workers: int | None = None,
                 device: str | None = None, options: VisionOptions | None = None, verbose: bool = False,
                 compile: str | None = None):
        require_ray()
        import ray
        import ray.data

        if not verbose:
            quiet_ray()
        if not ray.is_initialized():
            # address None: $RAY_ADDRESS, else a new local instance with this machine's CPUs and GPUs
            ray.init(address=address, include_dashboard=False, log_to_driver=verbose,
                     logging_level=logging.INFO if verbose else logging.ERROR)
        resources = ray.cluster_resources()
        cpus, gpus = resources.get("CPU", 1.0), int(resources.get("GPU", 0))
        self.use_gpus = gpus > 0 and device != "cpu"
        self.replicas = min(workers or gpus, gpus) if self.use_gpus else workers or 1
        if self.use_gpus:
            self.replica_resources: dict[str, float] = {"num_gpus": 1, "num_cpus": 1}
        else:  # CPU replicas share the cores, leaving half a core to the encoders
            self.replica_resources = {"num_cpus": max(0.5, (cpus - 0.5) / self.replicas)}
        self.encoders = max(1, int(cpus - (self.replicas if self.use_gpus else 0)))
        self.settings = ModelSettings(model, device, options or VisionOptions(),
                                      None if self.use_gpus else max(1, int(cpus) // self.replicas), compile)
        self.dtype_name = "bfloat16" if self.use_gpus else "float32"
        log.info("ray: %d model replicas (%s), up to %d encoding actors, on %s", self.replicas,
                 "1 GPU each" if self.use_gpus else f"{self.replica_resources['num_cpus']:.2f} CPUs each",
                 self.encoders, f"{cpus:g} CPUs and {gpus} GPUs")

    def embed_iter(self, items: Iterable[Any], batch_size: int | None = None) -> Iterator[Embedding]:
        """Stream `Embedding`s as the cluster finishes them (not in input order); memory stays bounded."""
        from ray.util.queue import Queue

        outstanding: dict[int, bytes] = {}  # index -> pickled item (a path, or a PDF page), until its result is back
        queue = Queue(maxsize=QUEUED_CHUNKS, actor_options={"num_cpus": 0})
        stop = threading.Event()
        feeder_error: list[BaseException] = []

        def feed() -> None:
            try:
                numbered = enumerate(items)
                while not stop.is_set() and (chunk := list(islice(numbered, CHUNK_ITEMS))):
                    rows = [(i, pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)) for i, item in chunk]
                    outstanding.update(rows)
                    put(rows)
            except BaseException as exc:  # raised again in the consumer
                feeder_error.append(exc)
            finally:
                put(END)

        def put(value: Any) -> None:
            from ray.util.queue import Full

            while not stop.is_set():
                try:
                    queue.put(value, timeout=0.2)
                    return
                except Full:
                    continue

        feeder = threading.Thread(target=feed, name="qvlsearch-ray-feed", daemon=True)
        feeder.start()
        try:
            yield from self.run_round(self.dataset(queue, batch_size), outstanding)
            feeder.join()
            if feeder_error:
                raise feeder_error[0]
            for _ in range(ROUNDS - 1):
                if not outstanding:
                    break
                log.warning("ray: %d items lost with their workers; trying each alone", len(outstanding))
                yield from self.run_round(self.lost_items(outstanding, batch_size), outstanding)
            for index in sorted(outstanding):
                yield Embedding(index, None, MediaError(
                    f"its Ray worker died on each of {ROUNDS * (1 + TASK_RETRIES)} tries (out of memory, or a "
                    "crash while decoding it)"))
        finally:
            stop.set()
            feeder.join(timeout=30)
            import ray

            ray.kill(queue.actor)

    def run_round(self, dataset: Any, outstanding: dict[int, bytes]) -> Iterator[Embedding]:
        for row in dataset.iter_rows():
            r: Results = pickle.loads(row["results"])
            for index, vector, facts, error in zip(r.indexes.tolist(), r.vectors, r.facts, r.errors, strict=True):
                if outstanding.pop(index, None) is None:
                    continue  # a late duplicate of a retried block
                if error:
                    yield Embedding(index, None, MediaError(error))
                else:
                    yield Embedding(index, vector, facts=facts)

    def lost_items(self, outstanding: dict[int, bytes], batch_size: int | None) -> Any:
        import ray.data

        rows = [{"index": i, "item": item} for i, item in sorted(outstanding.items())]
        return self.stages(ray.data.from_items(rows, override_num_blocks=len(rows)), batch_size, alone=True)

    def dataset(self, queue: Any, batch_size: int | None) -> Any:
        import ray.data

        source = ray.data.read_datasource(queue_datasource(queue), override_num_blocks=1, num_cpus=0)
        return self.stages(source, batch_size, alone=False)

    def stages(self, source: Any, batch_size: int | None, alone: bool) -> Any:
        from ray.data import ActorPoolStrategy

        context = source.context  # this dataset's own copy
        # Blocks of a few KiB, not Ray's 128 MiB: each chunk of items leaves the queue at once, and a
        # replica's packed results (one row) reach the driver as soon as they are ready.
        context.target_max_block_size = BLOCK_BYTES
        context.max_errored_blocks = -1  # a block lost with its worker: its items are tried again, alone
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        # Ray Data's default retries a task without end (a file that kills its worker would stall the run);
        # the named remote parameters that replace `ray_remote_args` (deprecated in 2.60) have no retries yet.
        retries = {"max_restarts": -1, "max_task_retries": TASK_RETRIES}
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=DeprecationWarning)
        # Alone, an actor holds one task at a time, so an item that kills it takes no other item down with it.
        in_flight = {"max_tasks_in_flight_per_actor": 1} if alone else {}
        encoded = source.map_batches(
            EncodeItems, fn_constructor_args=(self.settings, self.dtype_name), batch_size=1 if alone else ENCODE_BATCH,
            batch_format="numpy", compute=ActorPoolStrategy(min_size=1, max_size=self.encoders, **in_flight),
            num_cpus=0.25 if not self.use_gpus else 1, **retries)
        return encoded.map_batches(
            EmbedEncoded, fn_constructor_args=(self.settings, batch_size), batch_size=1 if alone else CHUNK_ITEMS,
            batch_format="numpy", compute=ActorPoolStrategy(size=self.replicas, **in_flight),
            **self.replica_resources, **retries)

