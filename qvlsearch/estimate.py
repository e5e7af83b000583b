"""What an index run will cost on this machine, told before the long part and refined as it goes.

The work is counted by kind before the model starts: photos, videos (their minutes and moments),
PDF pages and texts, reading only what a file's header says. Seconds per item of each kind are
measured from the items the run embeds (or a small sample, with `--dry-run`): the time between
one finished item and the next, which is what the run pays (decoding that the model waits for,
commits) and not what the model alone would take. The expected total is the work left of each
measured kind times its rate. Where bfloat16 is not native to the CPU (no AMX or AVX-512 BF16),
asking for it gets one warning with the factor measured on such a CPU.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("qvlsearch")

# The kinds of work, as the Summary's JSON names them, and as a line names one item of each.
KINDS = ("image", "video", "moment", "pdf", "text")
ITEM_NAMES = {"image": ("photo", "photos"), "video": ("video", "videos"), "moment": ("moment", "moments"),
              "pdf": ("PDF page", "PDF pages"), "text": ("text", "texts")}
LONG_SECONDS = 3600.0  # an estimate past this on a CPU names the levers
# bfloat16 over float32 on a CPU without native bf16: the 2b preset on the 2-core AMD EPYC build machine took
# 345 s against 41.9 s for a 1024×768 photo and 9.8 s against 1.4 s for a text query (issue 26, recorded in
# benchmarks/README.md, "What it costs"): the lesser factor is the one told.
BF16_SLOWDOWN = 7
BF16_SOURCE = "2b preset, 2-core AMD EPYC; benchmarks/README.md"


def unit_kind(fields: dict[str, Any]) -> str:
    """The kind of work of one unit the indexer plans (its row fields): a moment is a video's window."""
    return "moment" if fields.get("start_s") is not None else fields["kind"]


@dataclass
class CostMeter:
    """The work planned, done and timed, by kind (`KINDS`); `planned` stays empty until a plan is made."""

    planned: dict[str, int] = field(default_factory=dict)
    video_seconds: float = 0.0  # the planned videos' length
    done: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    last: float | None = None  # when the previous item came back (or the model was ready)
    batch_left: int = 0  # items of the current forward pass not recorded yet
    batch_share: float = 0.0  # the seconds each of them took: the pass's time, shared

    def plan(self, kinds: Iterable[str], video_seconds: float = 0.0) -> None:
        for kind in kinds:
            self.planned[kind] = self.planned.get(kind, 0) + 1
        self.video_seconds += video_seconds

    def start(self) -> None:
        """The model is ready (or an item failed): the next item's time counts from now."""
        self.last, self.batch_left = time.monotonic(), 0

    def record(self, kind: str, batch_size: int = 1) -> bool:
        """One item of `kind` came back now, from a forward pass of `batch_size` items (whose items come back
        one after another and share its time); True when it is the first of its kind (a rate to tell)."""
        now = time.monotonic()
        if self.batch_left <= 0:
            self.batch_left = batch_size
            self.batch_share = (now - (self.last if self.last is not None else now)) / batch_size
        self.batch_left -= 1
        self.last = now
        first = kind not in self.done
        self.done[kind] = self.done.get(kind, 0) + 1
        self.seconds[kind] = self.seconds.get(kind, 0.0) + self.batch_share
        return first

    def rate(self, kind: str) -> float | None:
        """Measured seconds per item of `kind`, None before one came back."""
        return self.seconds[kind] / self.done[kind] if self.done.get(kind) else None

    def seconds_left(self) -> float | None:
        """The planned work not done yet, at the measured rates; None before any kind is measured. Kinds
        not measured yet are left out (see `unmeasured`)."""
        rates = {kind: self.rate(kind) for kind in self.planned}
        if all(r is None for r in rates.values()):
            return None
        return sum(max(self.planned[k] - self.done.get(k, 0), 0) * r for k, r in rates.items() if r is not None)

    def unmeasured(self) -> list[str]:
        return [kind for kind in KINDS if self.planned.get(kind) and self.rate(kind) is None]

    def to_json(self) -> dict[str, Any]:
        """The plan (null when none was made), the items embedded and the measured seconds per item."""
        return {"planned": {k: self.planned[k] for k in KINDS if k in self.planned} if self.planned else None,
                "video_minutes": round(self.video_seconds / 60, 2) if self.planned else None,
                "embedded": {k: self.done[k] for k in KINDS if k in self.done},
                "seconds_per_item": {k: round(self.rate(k), 3) for k in KINDS if k in self.done}}

    def plan_line(self) -> str:
        """'to embed: 120 photos, 3 videos (12.5 minutes, 75 moments), 40 PDF pages, 2 texts'."""
        parts = []
        for kind in ("image", "video", "pdf", "text"):
            count = self.planned.get(kind, 0)
            if not count:
                continue
            part = counted(count, kind)
            if kind == "video":
                moments = self.planned.get("moment", 0)
                part += f" ({self.video_seconds / 60:.1f} minutes" + (f", {counted(moments, 'moment')})"
                                                                      if moments else ")")
            parts.append(part)
        return "to embed: " + (", ".join(parts) if parts else "nothing")

    def estimate_line(self) -> str:
        """'measured 41.9 s a photo, 9.8 s a PDF page; expected 14 h 3 min in all' (so far, with what is left
        unmeasured named)."""
        rates = [f"{seconds_text(self.rate(k))} a {ITEM_NAMES[k][0]}" for k in KINDS if self.rate(k) is not None]
        line = "measured " + ", ".join(rates)
        left = self.seconds_left()
        if left is not None:
            line += f"; expected {duration_text(sum(self.seconds.values()) + left)} in all"
            if self.unmeasured():
                line += f" (not counting {', '.join(ITEM_NAMES[k][1] for k in self.unmeasured())}: not measured yet)"
        return line


def counted(count: int, kind: str) -> str:
    singular, plural = ITEM_NAMES[kind]
    return f"{count:,} {singular if count == 1 else plural}"


def seconds_text(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.0f} s"


def duration_text(seconds: float) -> str:
    """'14 h 3 min', '3 min 20 s', '12 s'."""
    seconds = round(seconds)
    hours, minutes = divmod(seconds // 60, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {seconds % 60} s" if minutes else f"{seconds} s"


LOWER_MAX_PIXELS = (401408, 200704)  # each about half the time of a 1024×768 photo at the setting before


def levers_line(meter: CostMeter, device_type: str | None, max_pixels: int = 1843200) -> str | None:
    """On a CPU, when the whole run is expected to take long: what makes it shorter (a GPU, a lower --max-pixels
    than `max_pixels`, no moments), and how to see what that costs in quality on one's own files. None
    otherwise."""
    left = meter.seconds_left()
    if device_type != "cpu" or left is None or sum(meter.seconds.values()) + left < LONG_SECONDS:
        return None
    lower = [p for p in LOWER_MAX_PIXELS if p < max_pixels]
    levers = ["a GPU"]
    if lower and (meter.planned.get("image") or meter.planned.get("pdf")):
        levers.append(f"--max-pixels {lower[0]} (about half the time a photo)")
    if meter.planned.get("moment"):
        levers.append("--moment-seconds 0 (no moments)")
    settings = ",".join(str(p) for p in [max_pixels, *(lower or [max_pixels // 2])])
    return (f"long on a CPU: {', '.join(levers)} would make it shorter; measure what a setting costs in quality "
            f"on your files with `qvlsearch eval QUERIES --qrels QRELS --max-pixels {settings}`")


class Estimate:
    """What the indexer tells on the way: the plan, each kind's first rate with the expected total, and the
    levers once; `say` takes each line."""

    def __init__(self, say: Callable[[str], None] | None = None, max_pixels: int = 1843200):
        self.say = say or (lambda line: None)
        self.max_pixels = max_pixels
        self.meter = CostMeter()
        self.levers_told = False

    def planned(self) -> None:
        self.say(self.meter.plan_line())

    def recorded(self, kind: str, device_type: str | None, result: Any) -> None:
        """An item of `kind` came back (an `Embedding`): timed unless it failed (its time is not a rate)."""
        if result.error is not None:
            self.meter.start()
        elif self.meter.record(kind, result.batch_size):
            self.say(self.meter.estimate_line())
            self.tell_levers(device_type)

    def tell_levers(self, device_type: str | None) -> None:
        line = None if self.levers_told else levers_line(self.meter, device_type, self.max_pixels)
        if line:
            self.levers_told = True
            self.say(line)


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (x86 'flags', Arm 'Features'); None where it cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        return None
    return None


NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")  # x86 AMX, x86 AVX-512 BF16, Arm BF16


def native_bf16(flags: Sequence[str] | frozenset[str] | None = None) -> bool | None:
    """Whether the CPU computes in bfloat16 natively; None when its flags cannot be read."""
    flags = cpu_flags() if flags is None else flags
    return None if flags is None else any(flag in flags for flag in NATIVE_BF16_FLAGS)


def bf16_warning(flags: Sequence[str] | frozenset[str] | None = None) -> str | None:
    """The one line for a bfloat16 model on this CPU (or one with these `flags`), where bfloat16 is emulated;
    None where it is native or unknown."""
    if native_bf16(flags) is not False:
        return None
    return (f"bfloat16 on this CPU (no AMX or AVX-512 BF16) is emulated: measured {BF16_SLOWDOWN}× slower than "
            f"float32 on such a CPU ({BF16_SOURCE}); float32, the default on CPUs, is faster here")
