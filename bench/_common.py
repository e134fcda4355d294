"""What the benchmarks share: their command line, their result tables, a background sampler."""

from __future__ import annotations

import argparse
import itertools
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

Row = TypeVar("Row")


def command_line(doc: str | None, argv: Sequence[str] | None = None, /,
                 **options: int | float | str | tuple[int | float | str, str]) -> argparse.Namespace:
    """Parse a benchmark's options: ``--name VALUE`` for each keyword (``chunk_size`` is ``--chunk-size``),
    typed and defaulting as its value, or a bare ``--name`` flag for ``False``; ``(value, help)`` adds a
    help text. The description is the first line of ``doc`` (the benchmark's docstring)."""
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
