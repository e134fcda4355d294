"""rlmq.inputs: --input NAME=VALUE parsing, @file/@dir/@glob loading, splitting books."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import pytest

from rlmq.chapters import split_chapters, strip_gutenberg
from rlmq.demo import CORPUS
from rlmq.inputs import InputError, load_input_value, parse_input_arg

REPO = Path(__file__).resolve().parents[1]
MONTE_CRISTO = CORPUS  # the demo corpus rlmq ships


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


# --------------------------------------------------------------------------- NAME=VALUE


@pytest.mark.parametrize(
    "text, expected",
    [
        ("question=Who is richest?", ("question", "Who is richest?")),
        ("expr=a=b==c", ("expr", "a=b==c")),
        ("empty=", ("empty", "")),
        ("book=@data/book.txt", ("book", "@data/book.txt")),
        (" _x2 = keep spaces ", ("_x2", " keep spaces ")),
    ],
)
def test_parse_input_arg_ok(text, expected):
    assert parse_input_arg(text) == expected


@pytest.mark.parametrize(
    "text, needle",
    [
        ("question", "no '='"),
        ("=value", "empty name"),
        ("1st=x", "not a valid input field name"),
        ("my-name=x", "not a valid input field name"),
        ("two words=x", "not a valid input field name"),
        ("class=x", "keyword"),
    ],
)
def test_parse_input_arg_errors(text, needle):
    with pytest.raises(InputError) as exc:
        parse_input_arg(text)
    assert needle in _one_line(exc)
    assert isinstance(exc.value, ValueError)


# --------------------------------------------------------------------------- plain values


def test_plain_string_is_returned_as_is():
    assert load_input_value("Who is the richest?", split=None) == "Who is the richest?"
    assert load_input_value("", split=None) == ""
    assert load_input_value("a@b.c", split=None) == "a@b.c"


def test_double_at_escapes_a_literal_at():
    assert load_input_value("@@handle", split=None) == "@handle"


def test_plain_string_with_regex_split():
    assert load_input_value(" a ;; b;;;;c ", split=r";+") == ["a", "b", "c"]


# --------------------------------------------------------------------------- Monte Cristo


@pytest.fixture(scope="module")
def monte_cristo_chapters() -> list[str]:
    assert MONTE_CRISTO.is_file(), f"demo corpus missing: {MONTE_CRISTO}"
    chapters = load_input_value(f"@{MONTE_CRISTO}", split="chapters")
    assert isinstance(chapters, list)
    return chapters


def chapter_number(chapter: str) -> int:
    match = re.match(r"Chapter (\d+)\. ", chapter)
    assert match, chapter[:80]
    return int(match.group(1))


def test_monte_cristo_has_117_chapters_in_order(monte_cristo_chapters):
    chapters = monte_cristo_chapters
    assert len(chapters) == 117
    numbers = [chapter_number(c) for c in chapters]
    assert numbers == list(range(1, 118))


def test_monte_cristo_first_and_last_chapter(monte_cristo_chapters):
    first, last = monte_cristo_chapters[0], monte_cristo_chapters[-1]
    assert first.startswith("Chapter 1. Marseilles—The Arrival\n")
    # the body, not the table of contents line
    assert "On the 24th of February, 1815, the look-out at Notre-Dame de la Garde" in first
    assert "Chapter 2. Father and Son" not in first
    assert last.startswith("Chapter 117. The Fifth of October\n")
    assert last.rstrip().endswith("(Fac et spera)!’”")
    # Gutenberg licence footer and the closing footnotes are not part of the last chapter
    assert "END OF THE PROJECT GUTENBERG" not in last
    assert "FOOTNOTES" not in last
    assert "Project Gutenberg" not in "".join(monte_cristo_chapters)


def test_monte_cristo_volume_headings_do_not_end_chapters(monte_cristo_chapters):
    # "VOLUME TWO" sits between chapters 27 and 28 in the source text
    assert monte_cristo_chapters[26].startswith("Chapter 27. The Story")
    assert monte_cristo_chapters[26].endswith("but it is not a fortune.”")
    assert all("VOLUME" not in c[-200:] for c in monte_cristo_chapters)
    assert all(len(c) > 5000 for c in monte_cristo_chapters)


def test_monte_cristo_without_split_is_the_whole_text():
    text = load_input_value(f"@{MONTE_CRISTO}", split=None)
    assert isinstance(text, str)
    assert text.startswith("The Project Gutenberg eBook of The Count of Monte Cristo")
    assert len(text) > 2_500_000


# --------------------------------------------------------------------------- other books

PARA = (
    "It was a bright cold day in April, and the clocks were striking thirteen. "
    "The hallway smelt of boiled cabbage and old rag mats. " * 4
)


def _gutenberg(body: str) -> str:
    return (
        "The Project Gutenberg eBook of Test\n\nTitle: Test\n\n"
        "*** START OF THE PROJECT GUTENBERG EBOOK TEST ***\n\n"
        + body
        + "\n\n*** END OF THE PROJECT GUTENBERG EBOOK TEST ***\n\nSection 1. Licence. "
        + "Chapter 9. Not a chapter\n\n" + PARA
    )


def test_roman_headings_toc_and_long_preface():
    toc = "CONTENTS\n\nCHAPTER I. The Start\nCHAPTER II. The Middle\nCHAPTER III. The End\n\n"
    preface = "PREFACE\n\n" + PARA * 3 + "\n\n"
    body = "".join(f"CHAPTER {n}. {t}\n\n{PARA}{t} text.\n\n" for n, t in
                   [("I", "The Start"), ("II", "The Middle"), ("III", "The End")])
    chapters = split_chapters(_gutenberg(toc + preface + body))
    assert [c.split("\n")[0] for c in chapters] == [
        "CHAPTER I. The Start", "CHAPTER II. The Middle", "CHAPTER III. The End"]
    assert chapters[-1].endswith("The End text.")
    assert "PREFACE" not in "".join(chapters)


def test_numbering_restarting_per_book_keeps_every_chapter():
    body = ""
    for book in ("ONE", "TWO"):
        body += f"BOOK {book}\n\n"
        for n in ("I", "II"):
            body += f"CHAPTER {n}\n\n{PARA}Book {book.lower()} chapter {n}.\n\n"
    chapters = split_chapters(_gutenberg(body))
    assert len(chapters) == 4
    assert chapters[0].rsplit("\n", 1)[-1][-25:].endswith("Book one chapter I.")
    assert chapters[1].endswith("Book one chapter II.")  # "BOOK TWO" trimmed off its end
    assert chapters[3].endswith("Book two chapter II.")


def test_prose_mentioning_chapter_is_not_a_heading():
    body = f"Chapter 1. Start\n\n{PARA}\nchapter of the Life of Pope Alexander\nChapter 3 of his book\n{PARA}"
    assert len(split_chapters(body)) == 1


def test_strip_gutenberg():
    text = _gutenberg("Body here.")
    assert strip_gutenberg(text).strip() == "Body here."
    assert strip_gutenberg("no markers") == "no markers"


def test_chapters_without_headings_is_an_error(tmp_path):
    f = tmp_path / "essay.txt"
    f.write_text(PARA, encoding="utf-8")
    with pytest.raises(InputError) as exc:
        load_input_value(f"@{f}", split="chapters")
    msg = _one_line(exc)
    assert "no chapter headings" in msg and str(f) in msg


# --------------------------------------------------------------------------- files, dirs, globs


def test_json_file(tmp_path):
    f = tmp_path / "cfg.json"
    f.write_text(json.dumps({"chars": ["Dantès", "Danglars"], "n": 5}), encoding="utf-8")
    assert load_input_value(f"@{f}", split=None) == {"chars": ["Dantès", "Danglars"], "n": 5}


def test_jsonl_file_skips_blank_lines(tmp_path):
    f = tmp_path / "rows.JSONL"
    f.write_text('{"a": 1}\n\n[2, 3]\r\n"x"\n', encoding="utf-8")
    assert load_input_value(f"@{f}", split=None) == [{"a": 1}, [2, 3], "x"]


def test_text_file_utf8_bom_and_crlf(tmp_path):
    f = tmp_path / "t.md"
    f.write_bytes("\ufeffline one\r\nligne deux é\r\n".encode("utf-8"))
    assert load_input_value(f"@{f}", split=None) == "line one\nligne deux é\n"


def test_directory_lists_regular_files_sorted_by_name(tmp_path):
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "c.json").write_text('{"third": 3}', encoding="utf-8")
    (tmp_path / ".hidden").write_text("skip me", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "z.txt").write_text("not recursed", encoding="utf-8")
    assert load_input_value(f"@{tmp_path}", split=None) == ["first", "second", {"third": 3}]


def test_directory_with_split_flattens_in_file_order(tmp_path):
    (tmp_path / "02.txt").write_text("c\n---\nd", encoding="utf-8")
    (tmp_path / "01.txt").write_text("a\n---\nb\n", encoding="utf-8")
    assert load_input_value(f"@{tmp_path}", split=r"^---$") == ["a", "b", "c", "d"]


def test_glob_sorted_matches(tmp_path):
    for name, text in [("ch10.txt", "ten"), ("ch02.txt", "two"), ("notes.md", "no"), ("ch01.txt", "one")]:
        (tmp_path / name).write_text(text, encoding="utf-8")
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / "ch99.txt").write_text("deep", encoding="utf-8")
    assert load_input_value(f"@{tmp_path}/ch*.txt", split=None) == ["one", "two", "ten"]
    assert load_input_value(f"@{tmp_path}/**/ch*.txt", split=None) == ["one", "two", "ten", "deep"]


# --------------------------------------------------------------------------- errors


def _err(value: str, split: str | None = None) -> str:
    with pytest.raises(InputError) as exc:
        load_input_value(value, split=split)
    return _one_line(exc)


def test_missing_file(tmp_path):
    msg = _err(f"@{tmp_path}/nope.txt")
    assert "does not exist" in msg and "nope.txt" in msg


def test_broken_symlink(tmp_path):
    (tmp_path / "link.txt").symlink_to(tmp_path / "gone.txt")
    msg = _err(f"@{tmp_path}/link.txt")
    assert "broken symbolic link" in msg and "link.txt" in msg


def test_bare_at_sign():
    assert "must be followed by" in _err("@")


@pytest.mark.parametrize("content", [b"", b"  \n\t\n"])
@pytest.mark.parametrize("name", ["book.txt", "data.json", "rows.jsonl"])
def test_empty_file(tmp_path, name, content):
    f = tmp_path / name
    f.write_bytes(content)
    msg = _err(f"@{f}")
    assert msg.endswith("is empty") and str(f) in msg


def test_jsonl_of_only_blank_lines_is_empty(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text("\n\n\n", encoding="utf-8")
    assert _err(f"@{f}").endswith("is empty")


def test_empty_directory(tmp_path):
    (tmp_path / ".only-hidden").write_text("x", encoding="utf-8")
    (tmp_path / "subdir").mkdir()
    msg = _err(f"@{tmp_path}")
    assert "is empty" in msg and str(tmp_path) in msg


def test_glob_without_matches(tmp_path):
    msg = _err(f"@{tmp_path}/*.nothing")
    assert "matches no files" in msg and "*.nothing" in msg


def test_binary_file(tmp_path):
    f = tmp_path / "image.png"
    f.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    msg = _err(f"@{f}")
    assert "binary" in msg and str(f) in msg


def test_non_utf8_file(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("Dantès était là".encode("latin-1"))
    msg = _err(f"@{f}")
    assert "not UTF-8" in msg and str(f) in msg and "0xe8" in msg


def test_binary_file_inside_a_directory_is_named(tmp_path):
    (tmp_path / "a.txt").write_text("fine", encoding="utf-8")
    (tmp_path / "b.bin").write_bytes(b"\x00\x01\x02")
    msg = _err(f"@{tmp_path}")
    assert "b.bin" in msg and "binary" in msg


def test_invalid_json(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text('{"a": 1,\n "b": }', encoding="utf-8")
    msg = _err(f"@{f}")
    assert "not valid JSON" in msg and "line 2" in msg and str(f) in msg


def test_invalid_jsonl_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"a": 1}\n{"a": 2}\n{oops}\n', encoding="utf-8")
    msg = _err(f"@{f}")
    assert "line 3" in msg and "not valid JSON" in msg and str(f) in msg


def test_split_of_json_is_an_error(tmp_path):
    f = tmp_path / "x.json"
    f.write_text("[1, 2]", encoding="utf-8")
    msg = _err(f"@{f}", split="chapters")
    assert "applies to text" in msg and str(f) in msg


@pytest.mark.parametrize("pattern", ["(unclosed", "[a-", "*x"])
def test_invalid_regex(pattern):
    msg = _err("some text", split=pattern)
    assert "not a valid regular expression" in msg and pattern in msg


def test_empty_split_pattern():
    assert "empty" in _err("some text", split="")


def test_split_leaving_nothing_is_an_error(tmp_path):
    f = tmp_path / "dashes.txt"
    f.write_text("---\n---\n", encoding="utf-8")
    msg = _err(f"@{f}", split="-+")
    assert "is empty after splitting" in msg and str(f) in msg


def test_unreadable_file():
    """A file this process may not read (as root, checked in a child that drops to nobody)."""
    tmp = Path(tempfile.mkdtemp(prefix="rlmq-unreadable-"))
    f = tmp / "secret.txt"
    try:
        tmp.chmod(0o755)
        f.write_text("you cannot see me", encoding="utf-8")
        f.chmod(0o000)
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: drop privileges if needed, try to load, report through the pipe
            status = 1
            try:
                os.close(read_fd)
                if os.geteuid() == 0:
                    os.setgroups([])
                    os.setgid(65534)
                    os.setuid(65534)
                try:
                    load_input_value(f"@{f}", split=None)
                    report = "NO ERROR"
                except InputError as exc:
                    report, status = f"ERR {exc}", 0
                except BaseException as exc:
                    report = f"OTHER {type(exc).__name__}: {exc}"
                os.write(write_fd, report.encode())
            finally:
                os._exit(status)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as r:
            report = r.read().decode()
        _, wait_status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(wait_status) == 0, report
        assert report.startswith("ERR ") and "\n" not in report
        assert "cannot read input file" in report and "permission denied" in report
        assert str(f) in report
    finally:
        f.unlink(missing_ok=True)
        tmp.rmdir()


def test_input_error_is_one_line_even_from_multiline_causes():
    err = InputError("first line\nsecond   line")
    assert str(err) == "first line second line"
    assert isinstance(err, ValueError)
