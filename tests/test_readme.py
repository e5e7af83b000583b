"""The README tells the truth: its examples run and print what it shows (tests/readme_runner.py)."""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import readme_runner
import typer

from qvlsearch.cli import app

README = Path(__file__).resolve().parent.parent / "README.md"
TEXT = README.read_text()
BLOCKS = readme_runner.parse(TEXT)
UPDATE = "python tests/readme_runner.py --update README.md"


@pytest.fixture(scope="module")
def outputs() -> Iterator[dict[str, list[list[str]]]]:
    """Every example run once, in README order (in a folder under /tmp, which the namespaces hide)."""
    root = Path(tempfile.mkdtemp(prefix="qvlsearch-readme-", dir="/tmp"))
    try:
        yield readme_runner.run(BLOCKS, root / "checkout")
    except readme_runner.NamespaceError as e:
        pytest.skip(str(e))
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("block", BLOCKS, ids=[block.name for block in BLOCKS])
def test_the_example_prints_what_the_readme_shows(block, outputs):
    diff = readme_runner.differences(block, outputs[block.name])
    assert not diff, f"README.md line {block.first + 1} is stale; if the new output is right, run `{UPDATE}`\n{diff}"


def test_every_command_shown_is_run_or_in_a_block_that_says_it_is_not():
    """A `$ ` transcript is a checked ```text block, or a ```console one (not run, and the README says why)."""
    fences = re.findall(r"^```(\w*)\n(.*?)^```", TEXT, flags=re.M | re.S)
    shown = [info for info, body in fences if body.startswith("$ ")]
    assert set(shown) <= {"text", "console"}
    assert len([info for info in shown if info == "text"]) == len(BLOCKS) >= 10
    assert all(info == "bash" for info, body in fences if body.startswith(("make ", "hf ", "pip ")))


SYNOPSES = {m.group(1): m.group(0) for m in re.finditer(r"^```text\nqvlsearch (\w+) .*?^```", TEXT, flags=re.M | re.S)}


@pytest.mark.parametrize("name", sorted(SYNOPSES))
def test_a_synopsis_names_every_option_of_its_command(name):
    command = typer.main.get_command(app).commands[name]
    options = {opt for param in command.params for opt in param.opts if opt.startswith("--") and opt != "--help"}
    missing = sorted(opt for opt in options if not re.search(re.escape(opt) + r"\b", SYNOPSES[name]))
    assert not missing, f"the README's synopsis of `qvlsearch {name}` lacks {missing}"
