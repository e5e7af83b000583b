"""The `qvlsearch` command: a thin layer of Typer commands over the library.

Results go to stdout, logs and errors to stderr. Exit codes: 0 success, 1 some input
failed, 2 usage or setup error (bad option, missing model), 130 interrupted.
Heavy imports (torch, transformers) happen inside commands, so `--help` stays fast.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from . import __version__
from .errors import QvlsearchError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

app = typer.Typer(
    name="qvlsearch",
    help="Search your own photos, videos and documents by meaning (Qwen3-VL-Embedding and Qwen3-VL-Reranker).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ModelOption = Annotated[
    str,
    typer.Option("--model", envvar="QVLSEARCH_MODEL", help="Embedding model: Hugging Face id or local folder."),
]
DeviceOption = Annotated[str, typer.Option("--device", envvar="QVLSEARCH_DEVICE", help="auto, cpu, cuda or cuda:N.")]


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"qvlsearch {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Print the version and exit.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details to stderr.")] = False,
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="qvlsearch: %(message)s")


@app.command()
def embed(
    text: Annotated[
        list[str] | None, typer.Argument(help="Text to embed; '-' reads JSON lines of items from stdin.")
    ] = None,
    image: Annotated[list[str] | None, typer.Option("--image", help="Image path or URL (repeatable).")] = None,
    video: Annotated[list[str] | None, typer.Option("--video", help="Video path or URL (repeatable).")] = None,
    instruction: Annotated[str | None, typer.Option(help="Instruction (system prompt) for the embedding.")] = None,
    dim: Annotated[int | None, typer.Option(help="Matryoshka dimension: keep the first N values.")] = None,
    model: ModelOption = "Qwen/Qwen3-VL-Embedding-2B",
    device: DeviceOption = "auto",
) -> None:
    """Print embedding vectors as JSON lines: {"index": i, "vector": [...]} or {"index": i, "error": "..."}.

    With TEXT/--image/--video, embeds one item made of all of them. With '-', reads one item per line from stdin,
    e.g. {"text": "a cat"} or {"image": "cat.jpg"}.
    """
    from .embedder import Embedder

    if text == ["-"]:
        items = [parse_item_line(n, line) for n, line in enumerate(sys.stdin, 1) if line.strip()]
    else:
        item = {"text": " ".join(text)} if text else {}
        if image:
            item["image"] = image
        if video:
            item["video"] = video
        if instruction:
            item["instruction"] = instruction
        items = [item]
    embedder = Embedder(model, device=device)
    vectors = {}
    errors = {}
    for result in embedder.embed_iter(items, dim=dim):
        if result.error is None:
            vectors[result.index] = result.vector
        else:
            errors[result.index] = str(result.error)
            typer.echo(f"qvlsearch: {result.error}", err=True)
    for index in range(len(items)):
        record = (
            {"index": index, "error": errors[index]}
            if index in errors
            else {"index": index, "vector": [round(float(x), 7) for x in vectors[index]]}
        )
        sys.stdout.write(json.dumps(record) + "\n")
    if errors:
        raise typer.Exit(EXIT_FAILED)


def default_index_dir() -> Path:
    """$QVLSEARCH_INDEX, else the user's data folder, so that search finds it from anywhere."""
    import platformdirs

    return Path(os.environ.get("QVLSEARCH_INDEX") or platformdirs.user_data_path("qvlsearch") / "index")


IndexOption = Annotated[
    Path | None, typer.Option("--index", help="Index folder [env QVLSEARCH_INDEX; default: user data folder].")
]


@app.command()
def index(
    paths: Annotated[list[Path], typer.Argument(help="Folders or files to index.")],
    index_dir: IndexOption = None,
    model: ModelOption = "Qwen/Qwen3-VL-Embedding-2B",
    dim: Annotated[int | None, typer.Option(help="Matryoshka dimension of the search index.")] = None,
    quantize: Annotated[str, typer.Option(help="none, int8 or binary.")] = "none",
    index_type: Annotated[str, typer.Option(help="flat, hnsw, ivf or a FAISS factory string.")] = "flat",
    instruction: Annotated[str, typer.Option(help="Instruction for embedding the files.")] = (
        "Represent the user's input."),
    batch_size: Annotated[int | None, typer.Option(help="Most items per forward pass.")] = None,
    workers: Annotated[int | None, typer.Option(help="Threads decoding media (default: CPU count, max 8).")] = None,
    device: DeviceOption = "auto",
    min_pixels: Annotated[int, typer.Option(help="Smallest image size in pixels.")] = 4096,
    max_pixels: Annotated[int, typer.Option(help="Largest image size in pixels.")] = 1843200,
    total_pixels: Annotated[int, typer.Option(help="Pixel budget across a video's frames.")] = 7864320,
    fps: Annotated[float, typer.Option(help="Video frames sampled per second.")] = 1.0,
    max_frames: Annotated[int, typer.Option(help="Most frames per video.")] = 64,
    exclude: Annotated[list[str] | None, typer.Option(help="Glob of files or folders to skip (repeatable).")] = None,
    include_hidden: Annotated[bool, typer.Option(help="Also index hidden files and folders.")] = False,
    follow_symlinks: Annotated[bool, typer.Option(help="Enter symlinked folders.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Only report what would change.")] = False,
    strict: Annotated[bool, typer.Option(help="Exit 1 if any file failed.")] = False,
    wait: Annotated[bool, typer.Option(help="Wait for another writer instead of exiting.")] = False,
    commit_every: Annotated[int, typer.Option(help="Commit at least every N files.")] = 256,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")] = False,
) -> None:
    """Index photos, videos and text files into a FAISS + Parquet index; later runs redo only what changed."""
    from .indexer import Indexer, IndexOptions

    options = IndexOptions(
        model=model, dim=dim, quantize=quantize, index_type=index_type, instruction=instruction,
        min_pixels=min_pixels, max_pixels=max_pixels, total_pixels=total_pixels, fps=fps, max_frames=max_frames,
        device=None if device == "auto" else device, batch_size=batch_size, workers=workers,
        exclude=tuple(exclude or ()), include_hidden=include_hidden, follow_symlinks=follow_symlinks,
        commit_every=commit_every,
    )
    target = index_dir or default_index_dir()
    show_bar = sys.stderr.isatty() and not (quiet or as_json)
    with progress_bar(show_bar) as progress:
        summary = Indexer(target, options, wait=wait, dry_run=dry_run, progress=progress).run(paths)
    if as_json:
        sys.stdout.write(json.dumps(summary.to_json()) + "\n")
    for path, error in summary.failures:
        typer.echo(f"qvlsearch: {path}: {error}", err=True)
    if not (quiet or as_json):
        typer.echo(
            f"{'would index' if dry_run else 'indexed'} {summary.total} files in {summary.seconds:.1f}s: "
            f"{summary.added} added, {summary.updated} updated, {summary.moved} moved, {summary.removed} removed, "
            f"{summary.unchanged} unchanged, {summary.failed} failed ({target})", err=True)
    if strict and summary.failed:
        raise typer.Exit(EXIT_FAILED)


class progress_bar:
    """A rich progress bar on stderr when it is a terminal; a no-op callback otherwise."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar, self.task = enabled, None, None

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("indexing"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]} files/s, {task.fields[failed]} failed"),
                            TimeRemainingColumn(), console=Console(stderr=True), transient=True)
        self.bar.start()
        self.task = self.bar.add_task("index", total=None, rate="-", failed=0)
        self.started = time.monotonic()
        return self.update

    def update(self, done: int, total: int, failed: int) -> None:
        rate = f"{done / max(time.monotonic() - self.started, 1e-6):.1f}"
        self.bar.update(self.task, completed=done, total=total, rate=rate, failed=failed)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


@app.command()
def info(
    index_dir: IndexOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """Show an index: its settings, counts by kind and status, size on disk, and the files that failed."""
    from .store import Store

    target = index_dir or default_index_dir()
    store = Store.open(target, with_vectors=False)
    size = sum(p.stat().st_size for p in target.iterdir() if p.is_file() and p.name != "items.parquet")
    failed = [{"path": r["path"], "error": r["error"]} for r in store.rows.values() if r["status"] == "error"]
    report = {"index": str(target), "manifest": store.manifest, "size_bytes": size, "failed": failed}
    if as_json:
        sys.stdout.write(json.dumps(report, default=str) + "\n")
        return
    m, counts = store.manifest, store.manifest.get("counts", {})
    lines = [f"index:     {target}", f"model:     {m['model']} ({m.get('model_revision') or 'unknown revision'})",
             f"vectors:   dim {m['dim']} of {m['full_dim']}, quantize {m['quantize']}, index {m['index_type']}",
             f"items:     {counts.get('items', 0)} ({counts.get('ok', 0)} ok, {counts.get('error', 0)} failed); "
             + ", ".join(f"{k} {v}" for k, v in sorted(counts.get("by_kind", {}).items())),
             f"on disk:   {size / 2**20:.1f} MiB", f"updated:   {m['updated']}"]
    lines += [f"failed:    {f['path']}: {f['error']}" for f in failed]
    typer.echo("\n".join(lines))


@app.command()
def reindex(
    index_dir: IndexOption = None,
    dim: Annotated[int | None, typer.Option(help="New Matryoshka dimension.")] = None,
    quantize: Annotated[str | None, typer.Option(help="none, int8 or binary.")] = None,
    index_type: Annotated[str | None, typer.Option(help="flat, hnsw, ivf or a FAISS factory string.")] = None,
) -> None:
    """Rebuild the search structure from the stored full vectors, without the model."""
    from .indexer import lock_index
    from .store import QUANTIZATIONS, Store, StoreError

    target = index_dir or default_index_dir()
    lock = lock_index(target, wait=False)
    try:
        store = Store.open(target)
        if dim is not None and not 32 <= dim <= store.manifest["full_dim"]:
            raise StoreError(f"--dim must be between 32 and {store.manifest['full_dim']}, got {dim}")
        if quantize is not None and quantize not in QUANTIZATIONS:
            raise StoreError(f"--quantize must be one of {', '.join(QUANTIZATIONS)}, got {quantize!r}")
        for key, value in (("dim", dim), ("quantize", quantize), ("index_type", index_type)):
            if value is not None:
                store.manifest[key] = value
        store.commit()
    finally:
        lock.release()
    m = store.manifest
    typer.echo(f"rebuilt {target}: dim {m['dim']}, quantize {m['quantize']}, index {m['index_type']}", err=True)


def parse_item_line(number: int, line: str) -> dict:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"stdin line {number} is not JSON: {exc.msg}") from None
    return item if isinstance(item, dict) else {"text": str(item)}


def main() -> None:
    """Entry point: turns qvlsearch errors into one line on stderr and a documented exit code."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        code = app(standalone_mode=False)
        if code == EXIT_INTERRUPTED:  # Typer turns Ctrl-C inside a command into exit code 130
            typer.echo("qvlsearch: interrupted", err=True)
    except QvlsearchError as exc:
        typer.echo(f"qvlsearch: {exc}", err=True)
        code = EXIT_USAGE
    except (KeyboardInterrupt, typer.Abort):  # Abort is Click's form of Ctrl-C
        typer.echo("qvlsearch: interrupted", err=True)
        code = EXIT_INTERRUPTED
    except typer.TyperException as exc:  # usage errors: Click prints them itself
        exc.show()
        code = getattr(exc, "exit_code", EXIT_USAGE)
    sys.exit(code if isinstance(code, int) else EXIT_OK)
