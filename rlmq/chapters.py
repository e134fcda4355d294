"""A book as a list of chapters: ``--split chapters`` (and the demo's corpus).

Project Gutenberg's header and licence footer are dropped, then the text is cut at chapter
headings ("Chapter 1. Marseilles—The Arrival", "CHAPTER XII", "Chapter One: ..."), keeping only
chunks long enough to be chapters and dropping back matter (footnotes) after the last one.
"""

from __future__ import annotations

import re

__all__ = ["ChapterError", "split_chapters", "strip_gutenberg"]


class ChapterError(ValueError):
    """A text that does not split into chapters (one-line message)."""

_GUTENBERG_START = re.compile(
    r"^[ \t]*\*{3}[ \t]*START OF (?:THE|THIS) PROJECT GUTENBERG E-?(?:BOOK|TEXT)[^\n]*$",
    re.IGNORECASE | re.MULTILINE,
)
_GUTENBERG_END = re.compile(
    r"^[ \t]*(?:\*{3}[ \t]*END OF (?:THE|THIS) PROJECT GUTENBERG E-?(?:BOOK|TEXT)"
    r"|End of (?:the )?Project Gutenberg(?:'s|’s)? E-?(?:book|text))[^\n]*$",
    re.IGNORECASE | re.MULTILINE,
)


def strip_gutenberg(text: str) -> str:
    """Drop the Project Gutenberg header and licence footer, if the markers are there."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text


_NUMBER_WORDS = (
    "one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|thirteen|fourteen|fifteen|"
    "sixteen|seventeen|eighteen|nineteen|twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety|"
    "hundred|first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|last"
)
# A heading line: "Chapter 1. Marseilles—The Arrival", "CHAPTER XII", "Chapter One: ...".
# After the number: end of line, punctuation, or a capitalised title — so prose such as
# "chapter of the Life of Pope" or "Chapter 3 of his book" is not a heading.
_HEADING = re.compile(
    r"^[ \t]*(?:CHAPTER|Chapter)[ \t]+"
    r"(?P<num>\d+|[IVXLCDM]+|(?i:(?:" + _NUMBER_WORDS + r")(?:[- ](?:" + _NUMBER_WORDS + r"))?))"
    r"(?![\w’'])"
    r"(?:[ \t]*$|[ \t]*[.:—–-][^\n]{0,200}$|[ \t]+[A-Z“\"‘'(][^\n]{0,200}$)",
    re.MULTILINE,
)
# Text between a table-of-contents entry and the next heading is (nearly) nothing.
_MIN_CHAPTER_CHARS = 200
_TRAILING_DIVISION = re.compile(
    r"^[ \t]*(?:VOLUME|Volume|BOOK|Book|PART|Part)[ \t]+"
    r"(?:\d+|[IVXLCDM]+|(?i:" + _NUMBER_WORDS + r"))(?![\w’'])[^\n]{0,80}$",
    re.MULTILINE,
)
_BACK_MATTER = re.compile(r"^[ \t]*(?:FOOTNOTES|Footnotes|ENDNOTES|Endnotes)[ \t]*:?[ \t]*$", re.MULTILINE)
_ROMAN = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100, "D": 500, "M": 1000}


def _heading_number(num: str) -> int | None:
    if num.isdigit():
        return int(num)
    if set(num) <= set(_ROMAN):
        total = 0
        for i, ch in enumerate(num):
            v = _ROMAN[ch]
            total += -v if i + 1 < len(num) and _ROMAN[num[i + 1]] > v else v
        return total
    return None


def _nonspace_len(s: str) -> int:
    return len(s) - sum(1 for c in s if c.isspace())


def split_chapters(text: str, *, what: str = "the text") -> list[str]:
    """Cut a book into chapters; each item starts with its heading line.

    Drops the Project Gutenberg header/footer, front matter before the first chapter, the
    table of contents (heading lines with next to no text before the next heading), a
    volume/part heading left at the end of a chapter, and a closing FOOTNOTES section.
    """
    body = strip_gutenberg(text)
    if not body.strip():
        raise ChapterError(f"{what} is empty")
    headings = list(_HEADING.finditer(body))
    if not headings:
        raise ChapterError(
            f"no chapter headings (lines like 'Chapter 1. Title' or 'CHAPTER I') found in {what}; "
            f"use a regular expression as split instead"
        )

    # 1. A heading followed by (almost) no text before the next heading is a contents entry.
    bounds = [m.start() for m in headings[1:]] + [len(body)]
    substantial = [
        _nonspace_len(body[m.end():nxt]) >= _MIN_CHAPTER_CHARS for m, nxt in zip(headings, bounds, strict=True)
    ]
    # 2. The last contents entry may be followed by a long preface: drop a heading that comes
    #    right after a run of contents entries when numbering then goes backwards (117 → 1).
    kept: list[re.Match[str]] = []
    for i, m in enumerate(headings):
        if not substantial[i]:
            continue
        after_toc = i >= 1 and not substantial[i - 1]
        if after_toc:
            nxt = next((headings[j] for j in range(i + 1, len(headings)) if substantial[j]), None)
            here, there = _heading_number(m["num"]), nxt and _heading_number(nxt["num"])
            if here is not None and there is not None and there <= here:
                continue
        kept.append(m)
    if not kept:
        raise ChapterError(f"{what} has chapter headings but no chapter text after them")

    chapters = []
    ends = [m.start() for m in kept[1:]] + [len(body)]
    for n, (m, end) in enumerate(zip(kept, ends, strict=True)):
        chunk = body[m.start():end]
        if n == len(kept) - 1:
            back = _BACK_MATTER.search(chunk, m.end() - m.start())
            if back:
                chunk = chunk[: back.start()]
        chunk = _strip_trailing_division(chunk.strip())
        chapters.append(chunk)
    return chapters


def _strip_trailing_division(chunk: str) -> str:
    """Remove "VOLUME TWO" (plus illustration ids etc.) left at the end of a chapter."""
    divisions = list(_TRAILING_DIVISION.finditer(chunk))
    last = divisions[-1] if divisions else None
    if last is not None and last.start() > 0 and _nonspace_len(chunk[last.end():]) < 100:
        return chunk[: last.start()].rstrip()
    return chunk
