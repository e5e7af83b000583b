"""Run the command line with its stdout on a pseudo-terminal of a given width, as a user sees it."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios

from rich.cells import cell_len

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def on_terminal(*args: str, columns: int, env: dict[str, str], stream: str = "stdout") -> tuple[int, str]:
    """(exit code, what `qvlsearch ARGS` printed on a terminal `columns` wide, without colours): its `stream`
    (stdout or stderr) goes to the terminal, the other is thrown away."""
    code, printed = raw_terminal(*args, columns=columns, env=env, stream=stream)
    return code, ANSI.sub("", printed.replace("\r\n", "\n"))


def raw_terminal(*args: str, columns: int, env: dict[str, str], stream: str = "stdout") -> tuple[int, str]:
    """(exit code, the bytes `qvlsearch ARGS` wrote to `stream` on a terminal, decoded, control codes kept)."""
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    streams = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, stream: secondary}
    proc = subprocess.Popen([sys.executable, "-m", "qvlsearch", *args], **streams,
                            env={**env, "COLUMNS": str(columns)})
    os.close(secondary)
    chunks = []
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # the terminal closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    proc.wait(timeout=300)
    os.close(primary)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


def check_paths(lines: list[str], paths: list[str], columns: int) -> None:
    """Row i of a table shows paths[i] whole, or '…' and its end with the whole file name; no line is wider
    than the terminal, and no row is broken across lines (there are as many lines as rows)."""
    assert len(lines) == len(paths), "\n".join(lines)
    for line, path in zip(lines, paths, strict=True):
        assert cell_len(line) <= columns, line
        if path in line:
            continue
        assert "…" in line, (line, path)
        after = line[line.index("…") + 1:]
        shown = max((path[-k:] for k in range(1, len(path) + 1) if after.startswith(path[-k:])), key=len, default="")
        assert len(shown) > len(os.path.basename(path)), (line, path)  # the file name and a part of its folder
