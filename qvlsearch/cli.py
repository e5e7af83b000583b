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
    except QvlsearchError as exc:
        typer.echo(f"qvlsearch: {exc}", err=True)
        code = EXIT_USAGE
    except KeyboardInterrupt:
        typer.echo("qvlsearch: interrupted", err=True)
        code = EXIT_INTERRUPTED
    except typer.Abort:  # Click's form of Ctrl-C
        code = EXIT_INTERRUPTED
    except typer.TyperException as exc:  # usage errors: Click prints them itself
        exc.show()
        code = getattr(exc, "exit_code", EXIT_USAGE)
    sys.exit(code if isinstance(code, int) else EXIT_OK)
