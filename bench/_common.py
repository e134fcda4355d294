"""What the benchmarks share: their command line, their result tables, a background sampler."""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

Row = TypeVar("Row")


def command_line(doc: str | None, argv: Sequence[str] | None = None, /,
                 **options: int | float | str | tuple[int | float | str, str]) -> argparse.Namespace:
    """Parse a benchmark's options: ``--name VALUE`` for each keyword (``chunk_size`` is ``--chunk-size``),
    typed and defaulting as its value, or a bare ``--name`` flag for ``False``; ``(value, help)`` adds a
    help text. The description is the first line of ``doc`` (the benchmark's docstring)."""
    # SIGTERM (kill, timeout) unwinds like Ctrl-C: the `with` blocks stop the fleet, Redis and the stub
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    for name, option in options.items():
        default, help_text = option if isinstance(option, tuple) else (option, None)
        flag = "--" + name.replace("_", "-")
        if default is False:
            parser.add_argument(flag, action="store_true", help=help_text)
        else:
            parser.add_argument(flag, type=type(default), default=default, help=help_text)
    return parser.parse_args(argv)


@dataclass(frozen=True)
class Column(Generic[Row]):
    """A table column: its header, the format spec of a cell (whose width the header takes too) and the cell."""

    header: str
    spec: str  # [align]width[.precision]type, e.g. "7.1f", ">8s"
    cell: Callable[[Row], object]

    def heading(self) -> str:
        align = self.spec[0] if self.spec[:1] in ("<", ">", "^") else ""
        width = "".join(itertools.takewhile(str.isdigit, self.spec[len(align):]))
        return format(self.header, f"{align or ('<' if self.spec.endswith('s') else '>')}{width}s")


def print_table(caption: str, columns: Sequence[Column[Row]], rows: Sequence[Row]) -> None:
    """The caption, a line of headers, then one line per row; cells are separated by a space."""
    print(caption)
    print(" ".join(c.heading() for c in columns))
    for row in rows:
        print(" ".join(format(c.cell(row), c.spec) for c in columns))


@contextmanager
def every(interval: float, sample: Callable[[], None]) -> Iterator[None]:
    """Call ``sample`` every ``interval`` seconds in a background thread while the block runs."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval):
            sample()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class CPUSplit:
    """CPU seconds by part of a fleet: each root process (a worker, Redis, this process) and, for the roots
    named in ``trees``, what runs under it, every process named by ``part_of``. A process's last reading is kept when it ends, so a sandbox that
    is gone keeps its share; only what it used after the last sample is missed (sample it a few times a
    second). Sandbox processes are named by their command line (``kernel.py``, ``broker.py``, bwrap)."""

    def __init__(self, roots: dict[str, int], trees: tuple[str, ...] = ()) -> None:
        import psutil

        self.psutil = psutil
        self.roots = {name: psutil.Process(pid) for name, pid in roots.items()}
        self.trees = trees
        self.cpu: dict[Any, tuple[str, float]] = {}  # process -> (part, CPU seconds at its last reading)
        self.parts: dict[Any, str] = {}  # process (its pid and start time) -> part, read once

    def part_of(self, root: str, process) -> str:
        if process.pid == self.roots[root].pid:
            return root
        cmdline = process.cmdline()
        if cmdline and os.path.basename(cmdline[0]) == "bwrap":
            return "sandbox bwrap"
        for script in ("kernel.py", "broker.py"):
            if any(arg.endswith("/" + script) for arg in cmdline):
                return f"sandbox {script[:-3]}s"
        return root

    def sample(self) -> None:
        for root, process in self.roots.items():
            try:
                tree = [process, *(process.children(recursive=True) if root in self.trees else ())]
            except self.psutil.Error:
                continue
            for p in tree:
                try:
                    part = self.parts.get(p) or self.parts.setdefault(p, self.part_of(root, p))
                    times = p.cpu_times()
                except self.psutil.Error:
                    continue
                self.cpu[p] = (part, times.user + times.system)

    def seconds(self) -> dict[str, float]:
        parts: dict[str, float] = {}
        for part, seconds in self.cpu.values():
            parts[part] = parts.get(part, 0.0) + seconds
        return parts

    def processes(self, part: str) -> int:
        return sum(1 for name, _ in self.cpu.values() if name == part)
