"""The `qvlsearch` command: a thin layer of Typer commands over the library.

Results go to stdout, logs and errors to stderr. Exit codes: 0 success, 1 some input
failed, 2 usage or setup error (bad option, missing model), 130 interrupted.
Heavy imports (torch, transformers) happen inside commands, so `--help` stays fast.
`search`, `rerank` and `embed` hand their work to a running `qvlsearch serve` when there is
one for the same index and models (`client.py`), and then import no model library at all.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from . import DEFAULT_EMBEDDER, DEFAULT_RERANKER, __version__, check_compile_mode
from .cligroup import Group, set_verbose
from .errors import InputError, QvlsearchError, SettingError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
log = logging.getLogger("qvlsearch")


class OutputClosed(Exception):
    """The reader of stdout went away early (`| head -1`): the run ends quietly, with exit 0."""


def write_stdout(text: str | bytes) -> None:
    """Write results (text, or bytes such as file names) to stdout now, so that a closed pipe shows here."""
    try:
        if isinstance(text, bytes):
            sys.stdout.flush()
            sys.stdout.buffer.write(text)
            sys.stdout.buffer.flush()
        else:
            sys.stdout.write(text)
            sys.stdout.flush()
    except BrokenPipeError:
        raise OutputClosed from None

app = typer.Typer(
    name="qvlsearch",
    help="Search your own photos, videos and documents by meaning (Qwen3-VL-Embedding and Qwen3-VL-Reranker).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=Group,
)

ModelOption = Annotated[
    str | None,
    typer.Option("--model", envvar="QVLSEARCH_MODEL", help="Embedding model: Hugging Face id or local folder.",
                 show_default=f"the index's, else {DEFAULT_EMBEDDER}"),
]
DeviceOption = Annotated[str, typer.Option("--device", envvar="QVLSEARCH_DEVICE",
                                           help="auto, cpu, cuda, cuda:N or mps (Apple Silicon).")]
IndexOption = Annotated[
    Path | None, typer.Option("--index", help="Index folder (env QVLSEARCH_INDEX).",
                               show_default="the user data folder")
]
NoServerFlag = Annotated[bool, typer.Option(
    "--no-server", help="Load the models here even when a `qvlsearch serve` for this index and model runs.")]


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"qvlsearch {__version__}")
        raise typer.Exit()


class CurrentStderr(logging.StreamHandler):
    """Logs to sys.stderr as it is at each line: while a progress bar shows, rich's stand-in prints above it."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _) -> None:
        pass


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Print the version and exit.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details to stderr.")] = False,
) -> None:
    logging.basicConfig(format="qvlsearch: %(message)s", handlers=[CurrentStderr()])
    if sys.stderr.isatty():  # "loading the model ...": on a terminal, a slow start is not taken for a hang
        logging.getLogger("qvlsearch.load").setLevel(logging.INFO)
    logging.getLogger("huggingface_hub").propagate = False  # it prints through its own handler: once is enough
    # Libraries' warnings (Pillow's, torch's) are for their developers: on stderr only with --verbose.
    logging.captureWarnings(True)
    set_verbose(verbose)  # a command's own -v raises it later


@app.command()
def embed(
    text: Annotated[
        list[str] | None, typer.Argument(help="Text to embed; '-' reads JSON lines of items from stdin.")
    ] = None,
    image: Annotated[list[str] | None, typer.Option("--image", help="Image path or URL (repeatable).")] = None,
    video: Annotated[list[str] | None, typer.Option("--video", help="Video path or URL (repeatable).")] = None,
    instruction: Annotated[str | None, typer.Option(help="Instruction (system prompt) for the embedding.")] = None,
    dim: Annotated[int | None, typer.Option(help="Matryoshka dimension: keep the first N values.")] = None,
    model: Annotated[str | None, typer.Option(
        "--model", envvar="QVLSEARCH_MODEL", help="Embedding model: Hugging Face id or local folder.",
        show_default=f"the index's, else {DEFAULT_EMBEDDER}")] = None,
    index_dir: IndexOption = None,
    device: DeviceOption = "auto",
    no_server: NoServerFlag = False,
) -> None:
    """Print embedding vectors as JSON lines: {"index": i, "vector": [...]} or {"index": i, "error": "..."}.

    With TEXT/--image/--video, embeds one item made of all of them. With '-', reads one item per line from stdin,
    e.g. {"text": "a cat"} or {"image": "cat.jpg"}. Vectors are the index's model's, so that they compare with it.
    """
    check_device(device)
    if text == ["-"]:
        items = [parse_item_line(n, line) for n, line in enumerate(sys.stdin, 1) if line.strip()]
        if not items:
            raise InputError("no items on stdin: give one JSON object a line, such as {\"text\": \"a cat\"}")
    elif not (image or video or " ".join(text or ()).strip()):
        raise InputError("nothing to embed: give TEXT, --image, --video, or '-' and JSON lines on stdin")
    else:
        item = {"text": " ".join(text)} if text else {}
        if image:
            item["image"] = image
        if video:
            item["video"] = video
        if instruction:
            item["instruction"] = instruction
        items = [item]
    model = model or index_model(index_dir)
    server = None if no_server else find_server(index_dir or default_index_dir(), model=model)
    answer = server.embed(items, dim) if server else None
    if answer is None:
        answer = embed_here(items, dim, model, device)
    vectors, errors = answer
    for message in errors.values():
        typer.echo(f"qvlsearch: {message}", err=True)
    for index in range(len(items)):
        record = (
            {"index": index, "error": errors[index]}
            if index in errors
            else {"index": index, "vector": [round(float(x), 7) for x in vectors[index]]}
        )
        write_stdout(json.dumps(record) + "\n")
    if errors:
        raise typer.Exit(EXIT_FAILED)


def embed_here(items: list[dict], dim: int | None, model: str, device: str) -> tuple[dict, dict[int, str]]:
    """(vectors, errors) by item index, with the model loaded in this process."""
    from .hub import require_model

    require_model(model)
    from .embedder import Embedder

    vectors, errors = {}, {}
    for result in Embedder(model, device=device).embed_iter(items, dim=dim):
        if result.error is None:
            vectors[result.index] = result.vector
        else:
            errors[result.index] = str(result.error)
    return vectors, errors


def index_model(index_dir: Path | None, *, new: bool = False) -> str:
    """The model of the index at --index, or of the default index where there is one, else the default model;
    with `new` (the index may be made now), also for an --index that holds none yet."""
    from .store import read_manifest

    target = index_dir or default_index_dir()
    if (new or index_dir is None) and not os.path.exists(target / "manifest.json"):  # False where unreadable too
        return DEFAULT_EMBEDDER
    return read_manifest(target)["model"]


def find_server(index_dir: Path, **wanted):
    """A running `qvlsearch serve` that can do this command's work (see `client.find_server`)."""
    from .client import find_server

    return find_server(index_dir, **wanted)


def default_index_dir() -> Path:
    """$QVLSEARCH_INDEX, else the user's data folder, so that search finds it from anywhere."""
    import platformdirs

    return Path(os.environ.get("QVLSEARCH_INDEX") or platformdirs.user_data_path("qvlsearch") / "index")


def compile_mode_choice(mode: str | None) -> str | None:
    try:
        return check_compile_mode(mode)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


CompileOption = Annotated[str | None, typer.Option(
    "--compile", metavar="MODE", callback=compile_mode_choice,
    help="Run the model's layers under torch.compile: default, reduce-overhead (adds CUDA graphs) or "
         "max-autotune. Faster on GPUs after a warm-up of a minute or more; if compiling fails, the "
         "model runs as without it.")]


@app.command()
def index(
    paths: Annotated[list[Path], typer.Argument(
        help="Folders or files to index.", readable=False)],  # an unreadable one is reported by the run
    index_dir: IndexOption = None,
    model: ModelOption = None,
    dim: Annotated[int | None, typer.Option(
        help="Matryoshka dimension of the search index.", show_default="the index's, else the model's")] = None,
    quantize: Annotated[str | None, typer.Option(
        help="none, int8 or binary.", show_default="the index's, else none")] = None,
    index_type: Annotated[str | None, typer.Option(
        help="flat, hnsw, ivf, ivfpq or a FAISS factory string.", show_default="the index's, else flat")] = None,
    instruction: Annotated[str, typer.Option(help="Instruction for embedding the files.")] = (
        "Represent the user's input."),
    batch_size: Annotated[int | None, typer.Option(help="Most items per forward pass.")] = None,
    workers: Annotated[int | None, typer.Option(
        help="Workers decoding media.", show_default="CPU count, at most 16")] = None,
    processes: Annotated[bool, typer.Option(
        "--processes", help="Decode media in worker processes, not threads: on a GPU, faster for text-heavy "
                            "folders (the model's thread does not wait for Python's lock), and a decoder that "
                            "crashes on a photo too is that file's error (videos and PDFs always are); it costs "
                            "a few seconds to start them.")] = False,
    compile_mode: CompileOption = None,
    device: DeviceOption = "auto",
    ray: Annotated[bool, typer.Option(
        "--ray", help="Embed on a Ray cluster ($RAY_ADDRESS or --ray-address; else a local Ray instance using "
                      "all GPUs here). Paths must be readable on the workers at the same mount point.")] = False,
    ray_address: Annotated[str | None, typer.Option(
        help="Ray cluster to join with --ray.", show_default="$RAY_ADDRESS, else a local instance")] = None,
    ray_workers: Annotated[int | None, typer.Option(
        help="Model replicas with --ray.", show_default="one per GPU; on CPUs, 1")] = None,
    min_pixels: Annotated[int, typer.Option(help="Smallest image size in pixels.")] = 4096,
    max_pixels: Annotated[int, typer.Option(help="Largest image size in pixels.")] = 1843200,
    total_pixels: Annotated[int, typer.Option(help="Pixel budget across a video's frames.")] = 7864320,
    fps: Annotated[float, typer.Option(help="Video frames sampled per second.")] = 1.0,
    max_frames: Annotated[int, typer.Option(help="Most frames per video.")] = 64,
    moment_seconds: Annotated[float | None, typer.Option(
        help="Also embed each video in windows of this many seconds, so that search finds the moment; 0: off.",
        show_default="the index's, else 10")] = None,
    max_pages: Annotated[int | None, typer.Option(
        help="Most pages indexed per PDF; later ones are skipped with a warning.",
        show_default="the index's, else 200")] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="Glob of files or folders to skip (repeatable).")] = None,
    include_hidden: Annotated[bool, typer.Option(help="Also index hidden files and folders.")] = False,
    follow_symlinks: Annotated[bool, typer.Option(help="Enter symlinked folders.")] = False,
    dry_run: Annotated[bool, typer.Option(
        help="Only report what would change, and what it would cost: the work by kind, and seconds per item "
             "measured on a sample (--sample). Writes nothing.")] = False,
    sample: Annotated[int, typer.Option(
        min=0, help="With --dry-run: embed the first N items of each kind to measure their cost (0: no model).")] = 2,
    strict: Annotated[bool, typer.Option(help="Exit 1 if any file failed.")] = False,
    wait: Annotated[bool, typer.Option(help="Wait for another writer instead of exiting.")] = False,
    commit_every: Annotated[int, typer.Option(help="Commit at least every N files.")] = 256,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout (with --watch: one line "
                                                         "per committed batch).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")] = False,
    watch: Annotated[bool, typer.Option(
        "--watch", help="After indexing, keep the index current as files arrive, change and go, until Ctrl-C or "
                        "SIGTERM (exit 130 or 0; what has settled is committed first).")] = False,
    settle: Annotated[float, typer.Option(
        help="With --watch: take a file once its size and mtime have not changed for this many seconds.")] = 2.0,
    poll: Annotated[float | None, typer.Option(
        help="With --watch: poll every this many seconds instead of OS file events (without it: events, except on "
             "network and FUSE filesystems, polled every 5 s).")] = None,
    rescan_every: Annotated[float, typer.Option(
        help="With --watch: rescan every root this often, in seconds, for changes the OS dropped (0: never).")
    ] = 3600.0,
) -> None:
    """Index photos, videos, PDFs and text files into a FAISS + Parquet index; later runs redo only what changed.

    Each PDF page and each moment of a video gets a vector of its own, so that search finds the place.
    """
    from .indexer import Indexer, IndexOptions

    if ray:
        from .ray_engine import require_ray

        require_ray()
    model = model or index_model(index_dir, new=True)  # a later run follows the index's model
    options = IndexOptions(
        model=model, dim=dim, quantize=quantize, index_type=index_type, instruction=instruction,
        min_pixels=min_pixels, max_pixels=max_pixels, total_pixels=total_pixels, fps=fps, max_frames=max_frames,
        moment_seconds=moment_seconds, max_pages=max_pages, device=None if device == "auto" else device,
        batch_size=batch_size, workers=workers,
        processes=processes, compile=compile_mode, exclude=tuple(exclude or ()), include_hidden=include_hidden,
        follow_symlinks=follow_symlinks, commit_every=commit_every, ray=ray, ray_address=ray_address,
        ray_workers=ray_workers, verbose=logging.getLogger("qvlsearch").isEnabledFor(logging.INFO),
    )
    target = index_dir or default_index_dir()
    if watch:
        from .watcher import Watcher, WatchOptions

        if dry_run or settle < 0 or (poll is not None and poll <= 0) or rescan_every < 0:
            raise typer.BadParameter("--watch takes no --dry-run, --settle >= 0, --poll > 0 and --rescan-every >= 0")

        def report(what: str, summary) -> None:  # what: "indexed" (the first pass), "watch" or "rescan"
            label = what if what == "indexed" else f"{what}: indexed"
            print_summary(summary, target, label, quiet=quiet, as_json=as_json, extra={"what": what})

        watcher = Watcher(Indexer(target, options), paths, WatchOptions(settle, poll, rescan_every), wait=wait,
                          report=report, say=lambda line: typer.echo(f"qvlsearch: {line}", err=True))
        raise typer.Exit(watcher.run())
    show_bar = sys.stderr.isatty() and not (quiet or as_json)
    if not show_bar:
        logging.getLogger("qvlsearch.load").setLevel(logging.NOTSET)  # as --verbose says
    tell_cost = show_bar or (dry_run and not quiet)  # the estimate: on a terminal, and as a dry run's report
    with progress_bar(show_bar) as bar:
        indexer = Indexer(target, options, wait=wait, dry_run=dry_run, progress=bar and bar.update,
                          say=say if tell_cost else None, sample=sample if dry_run else 0)
        if bar:
            bar.meter = indexer.estimate.meter
        summary = indexer.run(paths)
    print_summary(summary, target, "would index" if dry_run else "indexed", quiet=quiet, as_json=as_json)
    if strict and summary.failed:
        raise typer.Exit(EXIT_FAILED)


def print_summary(summary, target: Path, what: str, *, quiet: bool, as_json: bool, extra: dict | None = None) -> None:
    """A run's failures and warnings, and its counts in a line on stderr (or as JSON, with `extra`, on stdout)."""
    if as_json:
        write_stdout(json.dumps({**summary.to_json(), **(extra or {})}) + "\n")
    for path, error in summary.failures:
        typer.echo(f"qvlsearch: {path}: {error}", err=True)
    for path, warning in summary.warnings:
        typer.echo(f"qvlsearch: warning: {path}: {warning}", err=True)
    if not (quiet or as_json):
        typer.echo(
            f"{what} {summary.total} files in {summary.seconds:.1f}s: "
            f"{summary.added} added, {summary.updated} updated, {summary.moved} moved, {summary.removed} removed, "
            f"{summary.unchanged} unchanged, {summary.failed} failed ({target})", err=True)


def say(line: str) -> None:
    """A line for the person at the terminal, on stderr (above the progress bar while one shows)."""
    print(f"qvlsearch: {line}", file=sys.stderr, flush=True)


class progress_bar:
    """A rich progress bar on stderr when it is a terminal (files done, their rate, failures and the time left
    at the rates measured by kind, from `meter`); None otherwise."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar, self.task, self.meter = enabled, None, None, None

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.bar = Progress(TextColumn("indexing"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]}, {task.fields[failed]} failed{task.fields[left]}"),
                            console=Console(stderr=True), transient=True)
        self.bar.start()
        self.task = self.bar.add_task("index", total=None, rate="-", failed=0, left="")
        self.started = time.monotonic()
        return self

    def update(self, done: int, total: int, failed: int) -> None:
        from .estimate import duration_text

        per_second = done / max(time.monotonic() - self.started, 1e-6)
        rate = f"{per_second:.1f} files/s" if per_second >= 1 else f"{per_second:.2g} files/s"
        left = self.meter.seconds_left() if self.meter is not None else None
        self.bar.update(self.task, completed=done, total=total, rate=rate, failed=failed,
                        left="" if left is None else f", {duration_text(left)} left")

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


@app.command()
def info(
    index_dir: IndexOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """Show an index: the folders and files it was built from, settings, counts by kind and status, its segments,
    size on disk, and the files that failed."""
    import pyarrow.compute as pc

    from .store import Snapshot, folder_bytes
    from .watcher import watcher_info

    target = index_dir or default_index_dir()
    snapshot = Snapshot(target, ["path", "root", "status", "error"], with_index=False)
    m = snapshot.manifest
    size = folder_bytes(target)
    failed = snapshot.items.filter(pc.equal(snapshot.items["status"], "error")).select(["path", "error"]).to_pylist()
    segments = m.get("segments", [])
    by_root = snapshot.items.group_by("root").aggregate([("path", "count_distinct")]).to_pylist()
    roots = sorted(({"path": r["root"], "files": r["path_count_distinct"]} for r in by_root if r["root"]),
                   key=lambda r: r["path"])
    watcher = watcher_info(target)
    report = {"index": str(target), "roots": roots, "manifest": m, "size_bytes": size, "segments": segments,
              "failed": failed, "watcher": watcher}
    if as_json:
        write_stdout(json.dumps(report, default=str) + "\n")
        return
    counts = m.get("counts", {})
    rows = sum(s["rows"] for s in segments)
    deleted = sum(s["deleted"] for s in segments)
    lines = [f"index:     {target}", *(f"root:      {r['path']} ({r['files']} files)" for r in roots),
             f"model:     {m['model']} ({m.get('model_revision') or 'unknown revision'})",
             f"vectors:   dim {m['dim']} of {m['full_dim']}, quantize {m['quantize']}, index {m['index_type']}",
             f"files:     {counts.get('files', counts.get('items', 0))}",
             f"items:     {counts.get('items', 0)} ({counts.get('ok', 0)} ok, {counts.get('error', 0)} failed; "
             "a PDF page and a video moment are items of their own); "
             + ", ".join(f"{k} {v}" for k, v in sorted(counts.get("by_kind", {}).items())),
             f"segments:  {len(segments)}, {rows} rows of which {deleted} deleted "
             f"({deleted / max(rows, 1):.0%}); `qvlsearch optimize` merges them into one",
             *(f"  {s['name']}: {s['rows']} rows, {s['deleted']} deleted, {s['index']}, {s['bytes'] / 2**20:.1f} MiB"
               for s in segments),
             f"on disk:   {size / 2**20:.1f} MiB", f"updated:   {m['updated']}"]
    if watcher:
        lines.append(f"watcher:   pid {watcher['pid']} since {watcher['since']} keeps it current "
                     f"({watcher['mode']}): {', '.join(watcher['roots'])}")
    lines += [f"failed:    {f['path']}: {f['error']}" for f in failed]
    write_stdout("\n".join(lines) + "\n")


@app.command()
def reindex(
    index_dir: IndexOption = None,
    dim: Annotated[int | None, typer.Option(help="New Matryoshka dimension.")] = None,
    quantize: Annotated[str | None, typer.Option(help="none, int8 or binary.")] = None,
    index_type: Annotated[str | None, typer.Option(
        help="flat, hnsw, ivf, ivfpq or a FAISS factory string.")] = None,
) -> None:
    """Rebuild the search structure from the stored full vectors, without the model (IVF lists are retrained)."""
    from .indexer import check_structure, lock_index
    from .store import Store, read_manifest

    target = index_dir or default_index_dir()
    m = read_manifest(target)  # no index there: say so, and create no lock in that folder
    check_structure(dim or m["dim"], quantize or m["quantize"], index_type or m["index_type"], m["full_dim"])
    lock = lock_index(target, wait=False)
    try:
        store = Store.open(target)
        damaged = store.rebuild(dim=dim, quantize=quantize, index_type=index_type)
    finally:
        lock.release()
    report_damaged(target, damaged)
    m = store.manifest
    typer.echo(f"rebuilt {target}: dim {m['dim']}, quantize {m['quantize']}, index {m['index_type']}", err=True)


@app.command()
def optimize(index_dir: IndexOption = None) -> None:
    """Merge the index's segments into one and drop deleted rows (searches get a little faster); no model needed.

    A segment that cannot be read is dropped and named; `qvlsearch index` then embeds its files again.
    """
    from .indexer import lock_index
    from .store import Store, read_manifest

    target = index_dir or default_index_dir()
    read_manifest(target)  # no index there: say so, and create no folder or lock
    lock = lock_index(target, wait=False)
    try:
        store = Store.open(target)
        before = len(store.manifest["segments"])
        dropped = sum(s["deleted"] for s in store.manifest["segments"])
        damaged = store.optimize()
    finally:
        lock.release()
    report_damaged(target, damaged)
    typer.echo(f"optimized {target}: {before} segments into {len(store.manifest['segments'])}, "
               f"{dropped} deleted rows dropped", err=True)


def report_damaged(target: Path, damaged: list[str]) -> None:
    for name in damaged:
        typer.echo(f"qvlsearch: dropped damaged segment {target / 'segments' / name}; run `qvlsearch index` on the "
                   "same folders to embed its files again", err=True)


RerankerOption = Annotated[
    str | None,
    typer.Option("--reranker", envvar="QVLSEARCH_RERANKER",
                 help="Reranker model: Hugging Face id or local folder.", show_default=DEFAULT_RERANKER),
]
TopK = Annotated[int, typer.Option("-k", "--top-k", min=1, help="How many results.")]
JsonFlag = Annotated[bool, typer.Option("--json", help="One JSON array on stdout (not with --jsonl or --paths).")]
JsonlFlag = Annotated[bool, typer.Option(
    "--jsonl", help="One JSON object per line on stdout (not with --json or --paths).")]
PathsFlag = Annotated[bool, typer.Option("--paths", help="Only paths, one per line (not with --json or --jsonl).")]
NullFlag = Annotated[bool, typer.Option("-0", "--null", help="With --paths: separate paths by NUL (for xargs -0).")]


def output_format(as_json: bool, as_jsonl: bool, paths: bool, null: bool) -> str:
    if sum((as_json, as_jsonl, paths)) > 1:
        raise InputError("choose one of --json, --jsonl and --paths")
    if null and not paths:
        raise InputError("-0/--null goes with --paths")
    if as_json or as_jsonl or paths:
        return "json" if as_json else "jsonl" if as_jsonl else "paths"
    return "table" if sys.stdout.isatty() else "tsv"


def emit(records: list[dict], fmt: str, null: bool = False, fs_paths: list[str] | None = None) -> None:
    """Write result records to stdout in the chosen format.

    `--paths` writes each file once, as the exact bytes of its name (`fs_paths`, as the OS gives them, else the
    records' paths), so that `xargs -0` opens a non-UTF-8 name too; tables and JSON show it with \\xNN escapes.
    """
    if fmt == "json":
        write_stdout(json.dumps(records) + "\n")
    elif fmt == "jsonl":
        write_stdout("".join(json.dumps(r) + "\n" for r in records))
    elif fmt == "paths":
        names = fs_paths if fs_paths is not None else [r["path"] for r in records]
        write_stdout(b"".join(os.fsencode(name) + (b"\0" if null else b"\n") for name in dict.fromkeys(names)))
    elif fmt == "tsv":

        from .tables import where

        placed = any(where(r) for r in records)
        rows = ([r["rank"], fmt_score(shown_score(r))] + ([fmt_score(r.get("rerank_score"))] if "rerank_score" in r
                else []) + ([r["date"]] if "date" in r else []) + [r.get("kind", ""), r["path"]]
                + ([where(r)] if placed else []) for r in records)
        write_stdout("".join("\t".join(str(f) for f in fields) + "\n" for fields in rows))
    else:
        from .tables import print_results

        print_results(records)


def shown_score(record: dict) -> float | None:
    """The score a table shows: the embedding's, else (words mode) the words' BM25."""
    return record.get("score") if record.get("score") is not None else record.get("words_score")


def fmt_score(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


@app.command()
def search(
    query: Annotated[str | None, typer.Argument(help="Query text; '-' reads it from stdin.")] = None,
    image: Annotated[list[str] | None, typer.Option("--image", help="Query image path or URL (repeatable).")] = None,
    video: Annotated[str | None, typer.Option("--video", help="Query video path or URL.")] = None,
    instruction: Annotated[str | None, typer.Option(
        help="Query instruction.", show_default="Retrieve images or text relevant to the user's query.")] = None,
    index_dir: IndexOption = None,
    top_k: TopK = 10,
    kind: Annotated[list[str] | None, typer.Option(
        "--kind", help="Only image, video, text or pdf: repeatable, or comma-separated (image,video).")] = None,
    under: Annotated[Path | None, typer.Option(help="Only files under this folder.")] = None,
    min_score: Annotated[float | None, typer.Option(help="Only results with at least this score.")] = None,
    after: Annotated[str | None, typer.Option(
        help="Only files taken (else modified) at or after this ISO date, e.g. 2024-05-31.")] = None,
    before: Annotated[str | None, typer.Option(
        help="Only files taken (else modified) before this ISO date, e.g. 2024-06-01.")] = None,
    near: Annotated[str | None, typer.Option(
        help="Only files whose GPS position is within KM of LAT,LON, e.g. 48.8584,2.2945,5.")] = None,
    camera: Annotated[str | None, typer.Option(help="Only files whose camera name contains this text.")] = None,
    sort: Annotated[str, typer.Option(help="score, or date: the same hits, newest first.")] = "score",
    mode: Annotated[str, typer.Option(
        help="hybrid: meaning and words, fused; semantic: meaning only; words: words only (BM25, no model). "
             'Quote "a phrase" to match it as one.')] = "hybrid",
    rerank: Annotated[bool, typer.Option("--rerank", help="Re-score the best candidates with the reranker.")] = False,
    rerank_top: Annotated[int, typer.Option(min=1, help="Candidates the reranker sees.")] = 50,
    reranker: RerankerOption = None,
    model: Annotated[str | None, typer.Option(
        "--model", envvar="QVLSEARCH_MODEL", help="Expected embedding model (must match the index's).")] = None,
    queries: Annotated[Path | None, typer.Option(
        help="File of queries, one per line (text or a JSON item); prints JSON lines tagged with the query, or "
             "with --json one line per query holding its results, or with --paths each file found once.")] = None,
    as_json: JsonFlag = False,
    as_jsonl: JsonlFlag = False,
    paths: PathsFlag = False,
    null: NullFlag = False,
    contact_sheet: Annotated[Path | None, typer.Option(
        help="Also write a JPEG of result thumbnails here (done in this process, never on a server).")] = None,
    device: DeviceOption = "auto",
    no_server: NoServerFlag = False,
) -> None:
    """Find the files that best match a text, image or video query (exit 1 when nothing matched)."""
    from .search import check_filters, with_dates
    from .words import check_mode

    fmt = output_format(as_json, as_jsonl, paths, null)
    check_filters(kind=kind, under=under, after=after, before=before, near=near, camera=camera, sort=sort)
    check_mode(mode)
    check_device(device)  # a bad filter or device fails before any index is read or model loaded
    if contact_sheet is not None:
        from .contact_sheet import check_sheet_path

        check_sheet_path(contact_sheet)
    if queries is not None:
        extra = next((name for name, value in (("a query TEXT", query), ("--image", image), ("--video", video),
                                                ("--contact-sheet", contact_sheet)) if value), None)
        if extra:
            raise InputError(f"--queries runs the queries of its file, one by one: {extra} cannot go with it")
    query_lines = read_queries(queries) if queries is not None else None
    if query == "-":
        query = sys.stdin.read().strip()
    if queries is None and not (query or image or video):
        raise typer.BadParameter("give a query: TEXT, '-', --image, --video or --queries FILE")
    target = index_dir or default_index_dir()
    options = dict(k=top_k, kind=kind, under=under, min_score=min_score, rerank=rerank, rerank_top=rerank_top,
                   instruction=instruction, after=after, before=before, near=near, camera=camera, sort=sort, mode=mode)
    server = None
    if not (no_server or contact_sheet):
        server = find_server(target, model=model, reranker=(reranker or DEFAULT_RERANKER) if rerank else None,
                             search=True)
    searcher = Searcher(target, server, options, model=model, reranker=reranker, device=device)
    if query_lines is not None:
        found, shown = 0, set()
        for number, line in enumerate(query_lines, 1):
            if line.strip():
                item = parse_item_line(number, line) if line.lstrip().startswith("{") else {"text": line.strip()}
                records = searcher.search(item)
                found += len(records)
                tag = item.get("text", item)
                if fmt == "json":
                    emit([{"query": tag, "results": records}], "jsonl")
                elif fmt == "paths":  # each file once, over all the queries
                    names = [name for name in searcher.fs_paths if name not in shown]
                    shown.update(names)
                    emit(records, fmt, null, names)
                else:
                    emit([{"query": tag, **r} for r in records], "jsonl")
        raise typer.Exit(EXIT_OK if found else EXIT_FAILED)
    item = {"text": query} if query else {}
    item.update({"image": list(image)} if image else {}, **({"video": video} if video else {}))
    records = searcher.search(item)
    if sort == "date" and fmt in ("table", "tsv"):
        records = with_dates(records, searcher.fs_paths)
    emit(records, fmt, null, searcher.fs_paths)
    if contact_sheet is not None:
        from .contact_sheet import write_contact_sheet

        write_contact_sheet(searcher.results, contact_sheet)
    raise typer.Exit(EXIT_OK if records else EXIT_FAILED)


class Searcher:
    """Runs `search` queries on a server when one was found, else (or when it may not read a query's
    file) on the index opened here; the records are the same either way."""

    def __init__(self, target: Path, server, options: dict, *, model: str | None, reranker: str | None,
                 device: str):
        self.target, self.server, self.options = target, server, options
        self.model, self.reranker, self.device = model, reranker, device
        self.index = None
        self.results: list = []  # the last local search's SearchResults
        self.fs_paths: list[str] = []  # the last search's file names as the OS needs them (for --paths)

    def search(self, item: dict) -> list[dict]:
        if self.server is not None:
            answer = self.search_remotely(item)
            if answer is not None:
                self.results = []
                records, self.fs_paths = answer
                return records
        if self.index is None:
            self.index = self.open()
        self.results = self.index.search(item, **self.options, reranker=self.reranker)
        self.fs_paths = [r.fs_path or r.path for r in self.results]
        return [r.to_json() for r in self.results]

    def search_remotely(self, item: dict) -> tuple[list[dict], list[str]] | None:
        from .client import ServerError

        try:
            return self.server.search(item, self.options)
        except ServerError as exc:
            if exc.kind == "empty_index":
                self.empty()
            raise

    def open(self):
        from .hub import model_setting
        from .search import open_index
        from .store import StoreError

        device = None if self.device == "auto" else self.device
        index = open_index(self.target, device=device, reranker_model=self.reranker,
                           preload=preloads(self.target, self.model, self.options["rerank"], self.reranker,
                                            self.options["mode"]))
        if len(index) == 0:
            self.empty()
        if self.model and model_setting(self.model) != index.manifest["model"]:
            raise StoreError(f"index {self.target} was built with model {index.manifest['model']!r}, not "
                             f"{self.model!r}; search it with that model, or index again with --model")
        return index

    def empty(self) -> None:
        typer.echo(f"qvlsearch: index {self.target} is empty; add files with `qvlsearch index PATH`", err=True)
        raise typer.Exit(EXIT_FAILED)


def check_device(device: str) -> None:
    """A bad --device fails at once, before any index is read or model loaded."""
    if device != "auto":
        from .qwen import pick_device

        pick_device(device)


def read_queries(path: Path) -> list[str]:
    """The lines of a --queries file; one that cannot be read is a one-line error before any model work."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise InputError(f"cannot read --queries file {path}: {reason}") from None


def preloads(target: Path, model: str | None, rerank: bool, reranker: str | None, mode: str = "hybrid"
             ) -> list[str]:
    """The models to load while the index is read: none when the search cannot go on anyway.

    A model that cannot be loaded fails here, at once, before torch is imported.
    """
    from .hub import model_setting, require_model
    from .store import read_manifest

    try:
        manifest = read_manifest(target)
    except QvlsearchError:
        return []  # open_index reports it
    if not manifest.get("counts", {}).get("ok") or (model and model_setting(model) != manifest["model"]):
        return []
    embedder = [] if mode == "words" else ["embedder"]  # words need no model
    if embedder:
        require_model(manifest["model"])
    if rerank:
        require_model(reranker or DEFAULT_RERANKER)
    return [*embedder, "reranker"] if rerank else embedder


@app.command()
def rerank(
    query: Annotated[str | None, typer.Argument(help=(
        "Query text. With --image it may be left out: a first argument that is a file is then a candidate."))] = None,
    candidates: Annotated[list[str] | None, typer.Argument(
        help="Files to rank; without them, read paths or `search --jsonl` lines from stdin.")] = None,
    image: Annotated[list[str] | None, typer.Option("--image", help="Query image path or URL (repeatable).")] = None,
    video: Annotated[str | None, typer.Option("--video", help="Query video path or URL.")] = None,
    instruction: Annotated[str | None, typer.Option(help="Reranker instruction.")] = None,
    reranker: RerankerOption = None,
    top_k: Annotated[int | None, typer.Option("-k", "--top-k", min=1, help="Keep only the best N.")] = None,
    as_json: JsonFlag = False,
    as_jsonl: JsonlFlag = False,
    paths: PathsFlag = False,
    null: NullFlag = False,
    device: DeviceOption = "auto",
    no_server: NoServerFlag = False,
) -> None:
    """Score candidate files against a query with the reranker, best first (unreadable ones last, unscored)."""
    from .search import SearchResult, document_item, query_item, ranked_by_rerank

    fmt = output_format(as_json, as_jsonl, paths, null)
    check_device(device)
    if (image or video) and query is not None and os.path.isfile(query):  # `rerank --image q.jpg a.jpg b.jpg`
        query, candidates = None, [query, *(candidates or [])]
    if not (query or image or video):
        raise InputError("give a query: TEXT, --image FILE, --video FILE, or some of them")
    rows = [{"path": c} for c in candidates] if candidates else read_candidates(sys.stdin)
    if not rows:
        raise typer.BadParameter("no candidates: give files as arguments or on stdin")
    results = [SearchResult(rank=i, id=row.get("id"), path=row["path"], kind=row.get("kind") or candidate_kind(
        row["path"]), score=row.get("score"), page=row.get("page"), start_s=row.get("start_s"),
        end_s=row.get("end_s")) for i, row in enumerate(rows, 1)]
    reranker = reranker or DEFAULT_RERANKER
    question, documents = query_item(query, image or (), video), [document_item(r) for r in results]
    places = any(r.page is not None or r.start_s is not None or r.kind == "pdf" for r in results)
    # pages and moments are reranked here: the server takes files and items, not places in them
    server = None if no_server or places else find_server(default_index_dir(), reranker=reranker)
    scores = server.rerank(question, documents, instruction) if server else None
    if scores is None:
        from .hub import require_model

        require_model(reranker)
        from .reranker import Reranker

        model = Reranker(reranker, device=None if device == "auto" else device)
        scores = model.rerank(question, documents, instruction=instruction, on_error="skip")
    row_of = {id(r): row for r, row in zip(results, rows, strict=True)}
    ordered = ranked_by_rerank(results, scores)[:top_k]
    # rows keep the fields they came with, and gain (or renew) rank, kind and rerank_score
    emit([{**row_of[id(r)], "rank": r.rank, "kind": r.kind, "rerank_score": r.to_json()["rerank_score"]}
          for r in ordered], fmt, null)
    raise typer.Exit(EXIT_OK if any(s is not None for s in scores) else EXIT_FAILED)


@app.command()
def serve(
    index_dir: IndexOption = None,
    host: Annotated[str, typer.Option(help="Address to listen on; other than loopback only with an API key.")] = (
        "127.0.0.1"),
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on (0: any free port).")] = 8765,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", envvar="QVLSEARCH_API_KEY", help="Require `Authorization: Bearer KEY` on every request.")] = None,
    idle_timeout: Annotated[float | None, typer.Option(
        min=0, help="Stop after this many seconds without a request.")] = None,
    model: Annotated[str | None, typer.Option(
        "--model", envvar="QVLSEARCH_MODEL", help="Embedding model.", show_default="the index's")] = None,
    reranker: RerankerOption = None,
    device: DeviceOption = "auto",
    allow_path: Annotated[list[Path] | None, typer.Option(
        "--allow-path", help="Also let requests name files under this folder (repeatable).")] = None,
    allow_urls: Annotated[bool, typer.Option("--allow-urls", help="Let requests name http(s) URLs to fetch.")] = False,
) -> None:
    """Keep the models loaded and answer HTTP: /v1/embeddings (OpenAI's API), /v1/rerank, /v1/search, /health.

    search, rerank and embed use a server that runs for the same index and models (see --no-server).
    Stop it with Ctrl-C or SIGTERM.
    """
    from .client import is_loopback
    from .hub import require_model

    if not is_loopback(host) and not api_key:
        raise QvlsearchError(f"--host {host} reaches beyond this machine: set an API key too "
                                 "(--api-key or QVLSEARCH_API_KEY)")
    target = index_dir or default_index_dir()
    if index_dir is None and not (target / "manifest.json").exists():
        target = None  # no index: embeddings and rerank only
    require_model(model or index_model(index_dir))
    from .server import run_server

    run_server(target, host=host, port=port, api_key=api_key, idle_timeout=idle_timeout, model=model,
               reranker=reranker, device=None if device == "auto" else device, allow_paths=allow_path or [],
               allow_urls=allow_urls)


def candidate_kind(path: str) -> str:
    from .fs import KindError, sniff_kind, suffix_kind

    try:
        return sniff_kind(path)
    except KindError:
        return suffix_kind(path) or "text"


def read_candidates(stream) -> list[dict]:
    """Candidates from stdin: one path per line, or the JSON lines of `qvlsearch search --jsonl`."""
    rows = []
    for number, line in enumerate(stream, 1):
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            row = parse_item_line(number, line)
            if "path" not in row:
                raise typer.BadParameter(f"stdin line {number} has no \"path\"")
            rows.append(row)
        else:
            rows.append({"path": line})
    return rows


def parse_item_line(number: int, line: str) -> dict:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"stdin line {number} is not JSON: {exc.msg}") from None
    return item if isinstance(item, dict) else {"text": str(item)}


@app.command()
def dupes(
    index_dir: IndexOption = None,
    threshold: Annotated[float | None, typer.Option(
        min=-1.0, max=1.0, help="Cosine similarity at which two files are near duplicates.", show_default="0.95")
    ] = None,
    kind: Annotated[list[str] | None, typer.Option(
        "--kind", help="Only image, video, text or pdf: repeatable, or comma-separated (image,video).")] = None,
    under: Annotated[Path | None, typer.Option(help="Only files under this folder.")] = None,
    as_json: JsonFlag = False,
    as_jsonl: JsonlFlag = False,
    paths: Annotated[bool, typer.Option(
        "--paths", help="Only the paths of all but the suggested keeper of each exact and near group, one per "
                        "line (not with --json or --jsonl).")] = False,
    similar: Annotated[bool, typer.Option(
        "--similar", help="With --paths, also all but the best shot of each similar group (bursts, series).")
    ] = False,
    null: NullFlag = False,
) -> None:
    """Print groups of duplicate files from the stored vectors, without the model: exact (same content),
    near (cosine >= --threshold, taken at the same instant or undated: copies) and similar (alike, but taken
    at different instants: bursts, series), each with a suggested keeper (the largest, then the oldest).
    Nothing is deleted or moved; `--paths -0 | xargs -0 ...` acts on the copies. Exit 1 when there are none."""
    from .dupes import DEFAULT_THRESHOLD, find_duplicates
    from .search import check_filters, open_index

    fmt = output_format(as_json, as_jsonl, paths, null)
    check_filters(kind=kind, under=under)
    groups = find_duplicates(open_index(index_dir or default_index_dir()),
                             DEFAULT_THRESHOLD if threshold is None else threshold, kind=kind, under=under)
    records = [g.to_json(n) for n, g in enumerate(groups, 1)]
    if fmt in ("json", "jsonl"):
        emit(records, fmt)
    elif fmt == "paths":
        emit([m for g, group in zip(records, groups, strict=True) if group.copies or similar
              for m in g["members"] if not m["keep"]], fmt, null)
    else:
        rows = [(str(g["group"]), g["type"], "keep" if m["keep"] else "", f"{m['similarity']:.4f}", str(m["size"]),
                 dupe_extent(m), (m["taken_at"] or m["modified_at"] or "")[:19], m["path"])
                for g in records for m in g["members"]]
        if fmt == "tsv":
            write_stdout("".join("\t".join(row) + "\n" for row in rows))
        else:
            from .tables import print_dupes

            print_dupes(rows)
    raise typer.Exit(EXIT_OK if groups else EXIT_FAILED)


def dupe_extent(member: dict) -> str:
    """'4000x3000', '4000x3000 12.5s' for a video, or '' for a text."""
    size = f"{member['width']}x{member['height']}" if member["width"] else ""
    return f"{size} {member['duration_s']:.1f}s".strip() if member["duration_s"] is not None else size


@app.command("eval")
def eval_command(
    queries: Annotated[Path, typer.Argument(help="JSON lines of queries: {\"id\": \"q1\", \"text\": \"...\"}.")],
    qrels: Annotated[Path, typer.Option(
        help="BEIR-style TSV: query-id, corpus-id (a file path, relative to this file's folder), score.")],
    index_dir: IndexOption = None,
    top_k: Annotated[int, typer.Option("-k", "--top-k", min=1, help="Cut for nDCG and MRR.")] = 10,
    dims: Annotated[str | None, typer.Option(
        help="Dimensions to compare, e.g. 128,256,512,full.", show_default="the index's")] = None,
    quantize: Annotated[str | None, typer.Option(
        help="Quantizations to compare, e.g. none,int8,binary.", show_default="the index's")] = None,
    rerank: Annotated[bool, typer.Option("--rerank", help="Also the figures after reranking.")] = False,
    rerank_top: Annotated[int, typer.Option(min=1, help="Candidates the reranker sees.")] = 50,
    reranker: RerankerOption = None,
    max_pixels: Annotated[str | None, typer.Option(
        help="Photo and page resolutions to compare, e.g. 1843200,401408,200704: the labelled files are embedded "
             "again at each (cached), and the seconds per item shown.")] = None,
    fps: Annotated[str | None, typer.Option(help="Video frame rates to compare, as --max-pixels.")] = None,
    max_frames: Annotated[str | None, typer.Option(help="Most frames per video to compare, as --max-pixels.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
    device: DeviceOption = "auto",
) -> None:
    """Measure search quality on your own labelled queries: recall@1/5/10, nDCG@10, MRR and latency for each
    dim and quantization and each search mode (semantic, words, hybrid), from the stored vectors (files are not
    embedded again); --rerank adds the reranked figures. --max-pixels, --fps and --max-frames compare media
    settings instead: what a lower resolution costs in quality and saves in seconds per item, beside the index's
    own setting."""
    from .evaluate import evaluate, parse_media_settings, parse_settings, read_qrels, read_queries
    from .search import open_index

    target = index_dir or default_index_dir()
    query_list, judgements = read_queries(queries), read_qrels(qrels)
    index = open_index(target, device=None if device == "auto" else device, reranker_model=reranker)
    settings = parse_settings(dims, quantize, index.manifest)
    media_settings = parse_media_settings(max_pixels, fps, max_frames, index.manifest)
    report = evaluate(index, query_list, judgements, k=top_k, settings=settings, rerank=rerank,
                      rerank_top=rerank_top, media_settings=media_settings)
    if report.missing_files:
        shown = ", ".join(report.missing_files[:3]) + (", ..." if len(report.missing_files) > 3 else "")
        typer.echo(f"qvlsearch: {len(report.missing_files)} files named in {qrels} are not in the index "
                   f"(not counted): {shown}", err=True)
    if report.unknown_queries:
        typer.echo(f"qvlsearch: {len(report.unknown_queries)} query ids in {qrels} are not in {queries}: "
                   + ", ".join(report.unknown_queries[:5]), err=True)
    for query_id, error in report.failed_queries:
        typer.echo(f"qvlsearch: query {query_id}: {error}", err=True)
    for path, error in report.failed_items:
        typer.echo(f"qvlsearch: {path}: {error}", err=True)
    typer.echo(f"qvlsearch: {report.evaluated} of {report.queries} queries evaluated (the others have no relevant "
               f"file in the index or failed); query embedding {report.embed_ms:.1f} ms"
               + (f", reranking {report.rerank_ms:.0f} ms a query" if report.rerank_ms is not None else ""), err=True)
    if as_json:
        write_stdout(json.dumps(report.to_json()) + "\n")
    elif media_settings:
        records = [s.to_json() for s in report.media_settings]
        print_eval_rows(["max_pixels", "fps", "max_frames", "index_setting"], records, "seconds_per_item")
    else:
        print_eval_rows(["dim", "quantize", "mode", "rerank_top"], [s.to_json() for s in report.settings],
                        "latency_ms")
    raise typer.Exit(EXIT_OK if report.evaluated else EXIT_FAILED)


def print_eval_rows(setting: list[str], records: list[dict], cost: str) -> None:
    """Eval's rows: the setting's columns, the figures, and what it costs; a table on a terminal, else TSV."""
    names = setting + [n for n in (records[0] if records else {}) if "@" in n] + [cost]
    rows = [names] + [["-" if r[n] is None else str(r[n]).lower() if isinstance(r[n], bool) else str(r[n])
                       for n in names] for r in records]
    if sys.stdout.isatty():
        from .tables import print_eval

        print_eval(names, rows[1:])
    else:
        write_stdout("".join("\t".join(row) + "\n" for row in rows))


def usage_message(exc: typer.TyperException) -> str:
    """A usage error in one line: a command's own BadParameter as it is worded, Click's with the help to read
    (in place of Click's usage block)."""
    if isinstance(exc, typer.BadParameter) and exc.param is None and exc.param_hint is None:
        message = exc.message
    else:
        ctx = getattr(exc, "ctx", None)
        message = exc.format_message().rstrip(".") + (f"; see `{ctx.command_path} --help`" if ctx else "")
    return " ".join(message.split())


def main() -> None:
    """Entry point: turns qvlsearch errors into one line on stderr and a documented exit code."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        code = app(standalone_mode=False)
        if code == EXIT_INTERRUPTED:  # Typer turns Ctrl-C inside a command into exit code 130
            typer.echo("qvlsearch: interrupted", err=True)
    except QvlsearchError as exc:
        typer.echo(f"qvlsearch: {exc.as_option() if isinstance(exc, SettingError) else exc}", err=True)
        code = EXIT_USAGE
    except OutputClosed:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing is left to flush at exit
        code = EXIT_OK
    except (KeyboardInterrupt, typer.Abort):  # Abort is Click's form of Ctrl-C
        typer.echo("qvlsearch: interrupted", err=True)
        code = EXIT_INTERRUPTED
    except typer.TyperException as exc:  # Click's usage errors, and the BadParameter a command raises
        code = getattr(exc, "exit_code", EXIT_USAGE)
        if type(exc).__name__ == "NoArgsIsHelpError":  # no command given: the help (Click keeps the class private)
            exc.show()
        else:
            typer.echo(f"qvlsearch: {usage_message(exc)}", err=True)
    # The process ends here: keep the garbage collector's last passes over every object torch and
    # transformers made (0.9 s of a 7 s `index` run that adds 10 files); files still close, handlers still run.
    gc.freeze()
    sys.exit(code if isinstance(code, int) else EXIT_OK)
