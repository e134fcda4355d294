"""Turn ``rlmq submit --input NAME=VALUE`` arguments into run inputs.

``VALUE`` is taken as a plain string unless it starts with ``@``:

* ``@path/to/file``  — the file's contents: ``.json`` → parsed JSON, ``.jsonl`` → list of
  parsed lines (blank lines skipped), anything else → UTF-8 text;
* ``@path/to/dir``   — every regular, non-hidden file directly in the directory, sorted by
  name → list of their contents (each loaded as above);
* ``@glob/*.txt``    — every regular file the glob matches (``**`` recurses), sorted → list;
* ``@@text``         — the literal string ``@text`` (escape for a value that starts with @).

``split`` turns text into a list: ``"chapters"`` cuts a book into chapters (Project Gutenberg
header/footer and table of contents dropped); any other value is a regular expression for
:func:`re.split` (compiled with ``re.MULTILINE``; empty parts dropped, parts stripped).

Every problem raises :class:`InputError`, whose message is one human-readable line naming the
argument or file at fault.

:func:`open_input_value` returns the list inputs (a directory, a glob, a ``.jsonl`` file) as a
:class:`StreamedInput` instead: its items are read as they are stored (``Client.submit`` writes them
chunk by chunk), so the client never holds the corpus. A file's problem is then raised while it is
read (before the run is recorded); the listing's problems (no files, a directory that cannot be read)
at once.
"""

from __future__ import annotations

import glob as _glob
import json
import keyword
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlmq.chapters import ChapterError, split_chapters

__all__ = [
    "InputError",
    "StreamedInput",
    "load_input_value",
    "open_input_value",
    "parse_input_arg",
    "split_text",
]


class InputError(ValueError):
    """A ``--input`` argument that cannot be turned into a run input (one-line message)."""

    def __init__(self, message: str) -> None:
        # Keep the message on one line whatever the cause text contains.
        super().__init__(" ".join(str(message).split()))


# --------------------------------------------------------------------------- NAME=VALUE


def parse_input_arg(text: str) -> tuple[str, str]:
    """Split ``"name=value"`` at the first ``=``; the name must be a Python identifier.

    The value is returned untouched (it may be empty, contain ``=``, or start with ``@``).
    """
    if "=" not in text:
        raise InputError(
            f"--input {text!r} has no '=': write --input NAME=VALUE "
            f"(for example --input question='Who is richest?' or --input book=@book.txt)"
        )
    name, value = text.split("=", 1)
    name = name.strip()
    if not name:
        raise InputError(f"--input {text!r} has an empty name before '=': write --input NAME=VALUE")
    if not name.isidentifier() or keyword.iskeyword(name):
        raise InputError(
            f"--input name {name!r} is not a valid input field name: use letters, digits and "
            f"underscores, not starting with a digit, and not a Python keyword (e.g. book_text)"
        )
    return name, value


# --------------------------------------------------------------------------- values


_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class StreamedInput:
    """A list input read from its files while it is stored: a ``.jsonl`` file's rows (``rows``), or one
    item per file (its parts with ``split``)."""

    files: tuple[Path, ...]
    split: str | None = None
    rows: bool = False

    def items(self) -> Iterator[Any]:
        if self.rows:
            yield from _jsonl_rows(self.files[0])
            return
        for f in self.files:
            item = _load_file(f, self.split)
            if self.split is not None:
                yield from item  # each file's parts, in file order
            else:
                yield item

    def load(self) -> list[Any]:
        return list(self.items())


def load_input_value(value: str, *, split: str | None = None) -> object:
    """Turn the VALUE of ``--input NAME=VALUE`` into the run input (see the module doc)."""
    opened = open_input_value(value, split=split)
    return opened.load() if isinstance(opened, StreamedInput) else opened


def open_input_value(value: str, *, split: str | None = None) -> object:
    """``load_input_value``, but a directory, glob or ``.jsonl`` file as a ``StreamedInput``, not yet read."""
    if split is not None and not isinstance(split, str):
        raise InputError(f"split must be a string or None, not {type(split).__name__}")
    if value.startswith("@@"):
        return _apply_split(value[1:], split, "the --input value")
    if not value.startswith("@"):
        return _apply_split(value, split, "the --input value")

    spec = value[1:]
    if not spec.strip():
        raise InputError("'@' must be followed by a file, directory or glob, e.g. @book.txt")
    path = Path(os.path.expanduser(spec))

    if _exists(path):
        if path.is_dir():
            return _open_directory(path, split)
        if path.suffix.lower() == ".jsonl" and path.is_file():
            if split is not None:
                raise InputError(f"split={split!r} applies to text, but {path} is JSONL")
            return StreamedInput((path,), rows=True)
        return _load_file(path, split)
    if _GLOB_CHARS.search(spec):
        return _open_glob(os.path.expanduser(spec), split)
    if path.is_symlink():
        raise InputError(f"input file {spec} is a broken symbolic link")
    raise InputError(f"input file {spec} does not exist (current directory: {os.getcwd()})")


def _exists(path: Path) -> bool:
    try:
        os.stat(path)
        return True
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        return False
    except PermissionError as exc:
        raise InputError(f"cannot access {path}: permission denied") from exc
    except OSError as exc:
        raise InputError(f"cannot access {path}: {exc.strerror or exc}") from exc


def _open_directory(path: Path, split: str | None) -> StreamedInput:
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except PermissionError as exc:
        raise InputError(f"cannot list directory {path}: permission denied") from exc
    except OSError as exc:
        raise InputError(f"cannot list directory {path}: {exc.strerror or exc}") from exc
    files = [Path(e.path) for e in entries if not e.name.startswith(".") and _is_regular(e)]
    if not files:
        raise InputError(f"input directory {path} is empty (no regular, non-hidden files in it)")
    return StreamedInput(tuple(files), split)


def _is_regular(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_file(follow_symlinks=True)
    except OSError:
        return False


def _open_glob(pattern: str, split: str | None) -> StreamedInput:
    matches = sorted(_glob.glob(pattern, recursive=True))
    files = [Path(m) for m in matches if os.path.isfile(m)]
    if not files:
        if matches:
            raise InputError(f"glob {pattern} matches no regular files (only {len(matches)} directories)")
        raise InputError(f"glob {pattern} matches no files (current directory: {os.getcwd()})")
    return StreamedInput(tuple(files), split)


def _load_file(path: Path, split: str | None) -> Any:  # a JSON value, the text, or its parts
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl") and split is not None:
        raise InputError(f"split={split!r} applies to text, but {path} is {suffix[1:].upper()}")
    if suffix == ".jsonl":
        return list(_jsonl_rows(path))
    data = _read(path)
    if not data.strip():
        raise InputError(f"input file {path} is empty")
    text = _decode(path, data, 0)

    if suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(
                f"input file {path} is not valid JSON: {exc.msg} (line {exc.lineno} column {exc.colno})"
            ) from exc
    return _apply_split(text, split, f"input file {path}")


def _jsonl_rows(path: Path) -> Iterator[Any]:
    """A ``.jsonl`` file's parsed lines (blank ones skipped), read a line at a time."""
    if not path.is_file():
        raise InputError(f"input {path} is not a regular file")
    lineno, offset, seen = 0, 0, False
    try:
        with open(path, "rb") as handle:
            for raw in handle:
                text = _decode(path, raw, offset, bom=offset == 0)
                offset += len(raw)
                for line in text.split("\n"):  # a lone \r ended a line too, as in a text file
                    lineno += 1
                    if not line.strip():
                        continue
                    seen = True
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise InputError(f"input file {path} line {lineno} is not valid JSON: {exc.msg} "
                                         f"(column {exc.colno})") from exc
                lineno -= 1  # the raw line's own newline starts no new line
    except PermissionError as exc:
        raise InputError(f"cannot read input file {path}: permission denied") from exc
    except OSError as exc:
        raise InputError(f"cannot read input file {path}: {exc.strerror or exc}") from exc
    if not seen:
        raise InputError(f"input file {path} is empty")


def _read(path: Path) -> bytes:
    if not path.is_file():
        raise InputError(f"input {path} is not a regular file")
    try:
        return path.read_bytes()
    except PermissionError as exc:
        raise InputError(f"cannot read input file {path}: permission denied") from exc
    except OSError as exc:
        raise InputError(f"cannot read input file {path}: {exc.strerror or exc}") from exc


def _decode(path: Path, data: bytes, offset: int, *, bom: bool = True) -> str:
    """UTF-8 text with newlines as \\n; ``offset``: where ``data`` starts in the file (for the message)."""
    if b"\x00" in data:
        raise InputError(f"input file {path} looks binary (it contains NUL bytes); inputs must be UTF-8 text")
    try:
        text = data.decode("utf-8-sig" if bom else "utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"input file {path} is not UTF-8 text (invalid byte 0x{data[exc.start]:02x} at offset "
            f"{offset + exc.start}); convert it, e.g. iconv -f latin1 -t utf-8"
        ) from exc
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _apply_split(text: str, split: str | None, what: str) -> str | list[str]:
    if split is None:
        return text
    return split_text(text, split, what=what)


def split_text(text: str, split: str, *, what: str = "the text") -> list[str]:
    """Split ``text`` by ``split``: ``"chapters"`` or a regular expression (see module doc)."""
    if split == "chapters":
        try:
            return split_chapters(text, what=what)
        except ChapterError as exc:
            raise InputError(str(exc)) from None
    if split == "":
        raise InputError("split pattern is empty: give a regular expression or 'chapters'")
    try:
        pattern = re.compile(split, re.MULTILINE)
    except re.error as exc:
        raise InputError(f"split pattern {split!r} is not a valid regular expression: {exc}") from exc
    parts = [p.strip() for p in pattern.split(text) if p is not None]
    parts = [p for p in parts if p]
    if not parts:
        raise InputError(f"{what} is empty after splitting by {split!r}")
    return parts
