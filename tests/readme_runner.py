"""Run the README's examples and compare their output with what it shows, or rewrite it (`--update`).

A ```text block whose first line starts with `$ ` is an example: each `$ ` line (with its `\\`
continuation lines, or its here-document up to the closing word) is a command, and the lines up to
the next `$ ` line are what it prints, stdout and stderr together. ```bash and ```console blocks are
never run: they hold set-up steps and transcripts that need what a test machine lacks (a model
download, a GPU, a Ray cluster). A `<!-- readme-test: mask REGEX -->` line just before a fence masks
REGEX (its first group, where it has one; `^` and `$` match at lines) in that block's output too.

The examples run in a fresh work folder that stands for a checkout: `sample_data/` copied in (every
mtime set to 2024-01-01), the `tiny` checkpoints in `checkpoints/tiny` (seed 0), and `tests/make_album.py`.
Each `## ` section runs in one bash session of its own (exports and `cd` carry over within it), in
README order; files carry over between sections. The sessions run in mount and network namespaces of
their own (`unshare`: as root, or in a user namespace), where the work folder is /home/me/qvlsearch
and its `tmp/` is /tmp, so that commands and their output are exactly as shown (a table's layout
depends on its paths' lengths), and a server's port is free. A command ending in `&` runs in the
background (a `qvlsearch serve` until its port answers) and is stopped at the end of its section; a
command with the comment `# on a terminal` runs on a pseudo-terminal (80 columns).

    python tests/readme_runner.py README.md            # check: print a diff per stale block, exit 1 if any
    python tests/readme_runner.py --update README.md   # rewrite each example's output from a real run
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from markdown_it import MarkdownIt

CHECKOUT = Path(__file__).resolve().parent.parent
SHOWN_ROOT = "/home/me/qvlsearch"  # the work folder, as the README shows it
FIXED_MTIME = 1704067200  # 2024-01-01T00:00:00Z: sample_data's mtimes, so that dates in output are stable
COMMAND_TIMEOUT = 600
SENTINEL = "__readme_runner_done__"
# What differs from run to run: masked on both sides before comparing
MASKS = [
    (re.compile(r"(?<=in )\d+(\.\d+)?s\b"), "#s"),  # 'indexed 46 files in 2.1s'
    (re.compile(r"\d+(\.\d+)? ms\b"), "# ms"),  # 'query embedding 301.2 ms'
    (re.compile(r'"pid": ?\d+'), '"pid":#'),
    (re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+(\+00:00)?"), "#time"),  # when a run wrote
]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
HEREDOC = re.compile(r"<<-?\s*'?(\w+)'?")
BACKGROUND = re.compile(r"\s&\s*(#.*)?$")
ON_A_TERMINAL = re.compile(r"#\s*on a terminal")
MASK_DIRECTIVE = re.compile(r"<!--\s*readme-test:\s*mask\s+(.+?)\s*-->")


@dataclasses.dataclass
class Command:
    lines: list[str]  # as the README shows it: the `$ ` line and its continuation
    expected: list[str]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)[2:]


@dataclasses.dataclass
class Block:
    section: str
    first: int  # index of the block's first content line in the README's lines
    last: int  # one past its last content line
    commands: list[Command]
    masks: list[re.Pattern]

    @property
    def name(self) -> str:
        return f"{self.section.lower().replace(' ', '-')}:{self.first}"


def parse(readme: str) -> list[Block]:
    """The README's examples, in order."""
    lines = readme.split("\n")
    blocks, section = [], ""
    for token in MarkdownIt().parse(readme):
        if token.type == "heading_open" and token.tag == "h2":
            section = re.sub(r"[^\w ]", "", lines[token.map[0]].lstrip("# ")).strip()
        if token.type != "fence" or token.info.strip() != "text" or not token.content.startswith("$ "):
            continue
        first, last = token.map[0] + 1, token.map[1] - 1
        before = lines[token.map[0] - 1] if token.map[0] else ""
        masks = [re.compile(m.group(1), re.M)] if (m := MASK_DIRECTIVE.search(before)) else []
        blocks.append(Block(section, first, last, split_commands(lines[first:last]), masks))
    return blocks


def split_commands(lines: list[str]) -> list[Command]:
    commands: list[Command] = []
    i = 0
    while i < len(lines):
        command = [lines[i]]
        i += 1
        if end := HEREDOC.search(command[0]):
            while i < len(lines) and command[-1] != end.group(1):
                command.append(lines[i])
                i += 1
        while command[-1].endswith("\\") and i < len(lines):
            command.append(lines[i])
            i += 1
        expected = []
        while i < len(lines) and not lines[i].startswith("$ "):
            expected.append(lines[i])
            i += 1
        commands.append(Command(command, expected))
    return commands


def mask(lines: list[str], extra: list[re.Pattern]) -> list[str]:
    """Lines with what varies between runs masked and runs of spaces made one (table widths follow values)."""
    text = "\n".join(lines)
    for pattern, replacement in MASKS:
        text = pattern.sub(replacement, text)
    for pattern in extra:
        text = pattern.sub(masked_match, text)
    out = [re.sub(r" {2,}", " ", line).rstrip() for line in text.split("\n")]
    while out and not out[-1]:
        out.pop()
    return out


def masked_match(match: re.Match) -> str:
    """The match with its first group (or all of it) as '#'."""
    if not match.re.groups:
        return "#"
    start, end = match.start(1) - match.start(), match.end(1) - match.start()
    return match.group(0)[:start] + "#" + match.group(0)[end:]


class Workspace:
    """The work folder that stands for a checkout, and the translation of paths between it and the README."""

    def __init__(self, root: Path):
        self.root = root.resolve()
        self.tmp = self.root / "tmp"

    def prepare(self) -> None:
        (self.root / "bin").mkdir(parents=True)
        self.tmp.mkdir()
        (self.root / "home").mkdir()
        shim = self.root / "bin" / "qvlsearch"
        shim.write_text(f"#!{sys.executable}\nimport sys\nfrom qvlsearch.cli import main\n\n"  # as pip writes it:
                        "if __name__ == '__main__':\n    sys.exit(main())\n")  # spawned workers import it
        python = self.root / "bin" / "python"
        python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
        for path in (shim, python):
            path.chmod(0o755)
        shutil.copytree(CHECKOUT / "sample_data", self.root / "sample_data")
        for name in ("make_album.py", "make_media.py"):
            (self.root / "tests").mkdir(exist_ok=True)
            shutil.copy(CHECKOUT / "tests" / name, self.root / "tests" / name)
        for path in [self.root / "sample_data", *(self.root / "sample_data").rglob("*")]:
            os.utime(path, (FIXED_MTIME, FIXED_MTIME))
        subprocess.run([sys.executable, "-m", "qvlsearch.tiny", str(self.root / "checkpoints" / "tiny"),
                        "--preset", "tiny", "--seed", "0"], env=self.env(), check=True, capture_output=True)

    def env(self) -> dict[str, str]:
        path = f"{SHOWN_ROOT}/bin:{os.environ.get('PATH', '/usr/bin:/bin')}"
        return {"PATH": path, "HOME": f"{SHOWN_ROOT}/home", "SHELL": "/bin/bash", "LANG": "C.UTF-8",
                "TZ": "UTC", "COLUMNS": "80", "LINES": "40", "TERM": "xterm", "PYTHONPATH": str(CHECKOUT),
                "HF_HOME": f"{SHOWN_ROOT}/hf", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "TMPDIR": "/tmp"}

    def mounts(self) -> str:
        """Shell lines that show the work folder at SHOWN_ROOT and its tmp/ at /tmp, keeping the paths that
        Python and the checkout need where they are, and bring up the loopback interface."""
        needed = [p for p in dict.fromkeys(map(Path, (CHECKOUT, sys.prefix, sys.base_prefix,
                                                      Path(sys.executable).resolve().parent)))
                  if p.is_relative_to("/tmp") or p.is_relative_to("/home")]
        lines = []
        for i, path in enumerate(needed):
            stash = self.root / "host" / str(i)
            lines.append(f"mkdir -p {stash} && mount --bind {shlex.quote(str(path))} {stash}")
        lines += ["mkdir -p /home && mount -t tmpfs tmpfs /home", f"mkdir -p {SHOWN_ROOT}",
                  f"mount --rbind {self.root} {SHOWN_ROOT}", f"mount --bind {SHOWN_ROOT}/tmp /tmp"]
        for i, path in enumerate(needed):
            quoted = shlex.quote(str(path))
            lines.append(f"mkdir -p {quoted} && mount --bind {SHOWN_ROOT}/host/{i} {quoted}")
        return " && ".join(lines + ["ip link set lo up", f"cd {SHOWN_ROOT}"])


class Session:
    """One bash process; commands run one at a time, each followed by a sentinel line to read up to."""

    def __init__(self, work: Workspace):
        self.work = work
        as_root = [] if os.geteuid() == 0 else ["--map-root-user"]
        self.proc = subprocess.Popen(["unshare", "--mount", "--net", "--propagation", "private", *as_root,
                                      "bash", "--noprofile", "--norc"], cwd=work.root, env=work.env(),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.backgrounds = 0
        if problem := self._send(f"exec 2>&1; {work.mounts()}").strip():
            self.close()
            raise NamespaceError(f"cannot lay out the work folder in a namespace of its own: {problem}")

    def _send(self, line: str) -> str:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(f"{line}\nprintf '\\n{SENTINEL}\\n'\n".encode())
        self.proc.stdin.flush()
        data, marker, deadline = b"", f"\n{SENTINEL}\n".encode(), time.monotonic() + COMMAND_TIMEOUT
        while marker not in data:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no end of output after {COMMAND_TIMEOUT} s from: {line}")
            if select.select([self.proc.stdout], [], [], 1.0)[0]:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    raise RuntimeError(f"the shell ended during: {line}\n{data.decode(errors='replace')}")
                data += chunk
        return data[: data.index(marker)].decode(errors="replace")

    def run(self, command: str) -> str:
        if BACKGROUND.search(command):
            output = self._background(BACKGROUND.sub("", command))
        elif ON_A_TERMINAL.search(command):
            output = self._send(f"script -qec {shlex.quote(command)} /dev/null < /dev/null")
        else:
            output = self._send(command)
        return screen(output)

    def _background(self, command: str) -> str:
        """Start it with its output to a file; a server is up once its port answers, else once it printed."""
        self.backgrounds += 1
        log = f"/tmp/.readme-background-{self.backgrounds}.log"
        ready = f"[ -s {log} ]"
        if re.search(r"\bqvlsearch serve\b", command):
            port = m.group(1) if (m := re.search(r"--port[ =](\d+)", command)) else "8765"
            ready = f"(exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null"
        self._send(f"{command} > {log} 2>&1 & background=$!")
        self._send(f"for _ in $(seq {COMMAND_TIMEOUT * 5}); do kill -0 $background 2>/dev/null || break; "
                   f"{ready} && break; sleep 0.2; done")
        return self._send(f"cat {log}")

    def close(self) -> None:
        """Stop what runs in the background (as Ctrl-C would not: SIGTERM, then wait), then the shell."""
        try:
            if self.backgrounds:
                self._send("kill $(jobs -p) 2>/dev/null; wait")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class NamespaceError(RuntimeError):
    """This machine lets us make no mount and network namespace (not root, and no user namespaces)."""


def screen(output: str) -> str:
    """What a terminal would show: no colours, and of a line rewritten with \\r only its last version."""
    lines = ANSI.sub("", output).split("\n")
    return "\n".join(line.rstrip("\r").split("\r")[-1] for line in lines)


def run(blocks: list[Block], root: Path) -> dict[str, list[list[str]]]:
    """Run every example; each block's commands' output lines, by block name."""
    work = Workspace(root)
    work.prepare()
    results: dict[str, list[list[str]]] = {}
    for section in dict.fromkeys(block.section for block in blocks):
        session = Session(work)
        try:
            for block in (b for b in blocks if b.section == section):
                outputs = []
                for command in block.commands:
                    output = session.run(command.text)
                    outputs.append([line.rstrip() for line in output.split("\n")])
                    while outputs[-1] and not outputs[-1][-1]:
                        outputs[-1].pop()
                results[block.name] = outputs
        finally:
            session.close()
    return results


def differences(block: Block, outputs: list[list[str]]) -> str:
    """A unified diff of the block as shown against the block as run (masked), or '' when they agree."""
    shown, ran = [], []
    for command, output in zip(block.commands, outputs, strict=True):
        shown += command.lines + mask(command.expected, block.masks)
        ran += command.lines + mask(output, block.masks)
    return "\n".join(difflib.unified_diff(shown, ran, "README.md", "as run", lineterm=""))


def rewrite(readme: str, blocks: list[Block], results: dict[str, list[list[str]]]) -> str:
    """The README with each example's output replaced by what it printed."""
    lines = readme.split("\n")
    for block in reversed(blocks):
        new = []
        for command, output in zip(block.commands, results[block.name], strict=True):
            new += command.lines + output
        lines[block.first : block.last] = new
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("readme", type=Path)
    parser.add_argument("--update", action="store_true", help="rewrite each example's output from a real run")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (its path is printed)")
    args = parser.parse_args(argv)
    text = args.readme.read_text()
    blocks = parse(text)
    root = Path(tempfile.mkdtemp(prefix="qvlsearch-readme-", dir="/tmp"))
    started = time.monotonic()
    try:
        results = run(blocks, root / "checkout")
    finally:
        if args.keep:
            print(f"work folder: {root / 'checkout'}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(f"ran {sum(len(b.commands) for b in blocks)} commands in {len(blocks)} blocks in "
          f"{time.monotonic() - started:.0f} s", file=sys.stderr)
    if args.update:
        args.readme.write_text(rewrite(text, blocks, results))
        return 0
    stale = [diff for block in blocks if (diff := differences(block, results[block.name]))]
    print("\n\n".join(stale))
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
