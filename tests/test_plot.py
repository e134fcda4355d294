"""rlmq.demo.plot: wealth rows in long or wide shape → normalised series → a real PNG file."""

from __future__ import annotations

import math
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from rlmq.demo.plot import DEFAULT_TITLE, WealthDataError, moving_average, normalise_wealth_rows, plot_wealth

REPO = Path(__file__).resolve().parents[1]
CHARACTERS = ["Edmond Dantès", "Fernand Mondego", "Danglars", "Villefort", "Mercédès"]


def _wealth(character_index: int, chapter: int) -> int:
    """Deterministic 1..10 trajectory per character (a rise, a fall, some wobble)."""
    phase = character_index * 0.9
    value = 5.5 + 4 * math.sin(chapter / 117 * math.pi * (1 + character_index / 3) + phase)
    value += 0.8 * math.sin(chapter * 1.7 + character_index)
    return max(1, min(10, round(value)))


def long_rows() -> list[dict]:
    return [
        {"chapter": ch, "character": name, "wealth": _wealth(i, ch)}
        for ch in range(1, 118)
        for i, name in enumerate(CHARACTERS)
    ]


def wide_rows() -> list[dict]:
    return [
        {"chapter": ch, **{name: _wealth(i, ch) for i, name in enumerate(CHARACTERS)}}
        for ch in range(1, 118)
    ]


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind!r} chunk"
        chunks.append((kind, body))
        pos += 12 + length
    return chunks


# --------------------------------------------------------------------------- the picture


def test_plot_writes_a_valid_png_of_sensible_size(tmp_path):
    out = tmp_path / "nested" / "wealth.png"
    assert plot_wealth(long_rows(), str(out)) == str(out)
    data = out.read_bytes()
    chunks = _png_chunks(data)
    kinds = [k for k, _ in chunks]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds
    width, height = struct.unpack(">II", chunks[0][1][:8])
    assert 800 <= width <= 3000 and 500 <= height <= 2000
    assert width > height  # a landscape chart
    assert 30_000 < len(data) < 3_000_000
    # every IDAT chunk decompresses to exactly height rows of width RGBA pixels (+ filter byte)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert len(raw) == height * (1 + width * 4)


def test_plot_draws_one_coloured_line_per_character(tmp_path):
    from PIL import Image  # pillow ships with matplotlib

    out = tmp_path / "wealth.png"
    plot_wealth(long_rows(), str(out))
    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        colours = img.convert("RGB").getcolors(maxcolors=1 << 24)
    assert colours is not None  # (None: more colours than maxcolors)
    counts = {colour: n for n, colour in colours}
    tab10 = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    for colour in tab10:  # the first five tab10 colours, one per character line
        assert counts.get(colour, 0) > 300, f"line colour {colour} hardly drawn"
    assert counts.get((140, 86, 75), 0) < 50  # no sixth series


def test_title_and_labels_are_drawn_and_title_is_overridable(tmp_path):
    # the SVG backend keeps each text as a comment next to its glyph paths
    default = tmp_path / "default.svg"
    plot_wealth(wide_rows(), str(default))
    svg = default.read_text(encoding="utf-8")
    assert f"<!-- {DEFAULT_TITLE} -->" in svg
    assert "<!-- Chapter -->" in svg and "Wealth (1 = destitute" in svg
    for name in CHARACTERS:
        assert f"<!-- {name} -->" in svg
    custom = tmp_path / "custom.svg"
    plot_wealth(wide_rows(), str(custom), title="Fortunes in Paris")
    svg = custom.read_text(encoding="utf-8")
    assert "<!-- Fortunes in Paris -->" in svg and DEFAULT_TITLE not in svg


def test_render_check_image():
    """The picture a person looks at: /tmp/rlmq_plot_check.png."""
    path = plot_wealth(long_rows(), "/tmp/rlmq_plot_check.png", smoothing=7)
    assert Path(path).stat().st_size > 30_000


@pytest.mark.parametrize("smoothing", [0, -3, 2.5, True])
def test_bad_smoothing(tmp_path, smoothing):
    with pytest.raises(ValueError, match="smoothing"):
        plot_wealth(long_rows(), str(tmp_path / "x.png"), smoothing=smoothing)


def test_missing_matplotlib_gives_an_install_hint(tmp_path):
    """Run without site-packages (-S), so matplotlib is really absent."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('plot', {str(REPO / 'rlmq' / 'demo' / 'plot.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "assert 'matplotlib' not in sys.modules\n"
        "print(len(m.normalise_wealth_rows([{'chapter': 1, 'A': 2}])))\n"
        "try:\n"
        f"    m.plot_wealth([{{'chapter': 1, 'A': 2}}], {str(tmp_path / 'x.png')!r})\n"
        "except ImportError as e:\n"
        "    print('IMPORT-ERROR', e)\n"
    )
    proc = subprocess.run([sys.executable, "-S", "-I", "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("1\n")
    assert "IMPORT-ERROR" in proc.stdout and "pip install 'rlmq[demo]'" in proc.stdout
    assert not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------- normalisation


def test_long_and_wide_shapes_normalise_identically():
    long_ = normalise_wealth_rows(long_rows())
    wide = normalise_wealth_rows(wide_rows())
    assert long_ == wide
    assert list(long_) == CHARACTERS
    for name in CHARACTERS:
        assert [c for c, _ in long_[name]] == list(range(1, 118))
        assert all(1 <= w <= 10 and isinstance(w, float) for _, w in long_[name])


def test_normalise_sorts_chapters_mixes_shapes_and_skips_none():
    rows = [
        {"chapter": 3, "character": "Dantès", "wealth": 9},
        {"chapter": 1, "Dantès": 2, "Danglars": "5", "Morrel": None},
        {"chapter": "2", "character": "  Danglars ", "wealth": 6.5},
        {"chapter": 2.0, "character": "Dantès", "wealth": 1},
    ]
    assert normalise_wealth_rows(rows) == {
        "Dantès": [(1, 2.0), (2, 1.0), (3, 9.0)],
        "Danglars": [(1, 5.0), (2, 6.5)],
    }


@pytest.mark.parametrize(
    "rows, needle",
    [
        ([], "empty"),
        ([{"chapter": 1, "A": None}], "empty"),
        ("chapter,A\n1,2", "list of rows"),
        (None, "list of rows"),
        ([["chapter", 1]], "row 0: expected a dict"),
        ([{"chapter": 1, "A": 2}, {"A": 3}], "row 1: missing 'chapter'"),
        ([{"chapter": "one", "A": 2}], "chapter must be a whole number"),
        ([{"chapter": 1.5, "A": 2}], "chapter must be a whole number"),
        ([{"chapter": True, "A": 2}], "chapter must be a whole number"),
        ([{"chapter": -1, "A": 2}], "must not be negative"),
        ([{"chapter": 1, "A": "rich"}], "row 0 (A): wealth must be a number"),
        ([{"chapter": 1, "A": float("nan")}], "finite"),
        ([{"chapter": 1, "A": [3]}], "wealth must be a number"),
        ([{"chapter": 1, "character": "A", "wealth": None}], "wealth must be a number"),
        ([{"chapter": 1, "character": "A"}], "missing 'wealth'"),
        ([{"chapter": 1, "wealth": 3}], "missing 'character'"),
        ([{"chapter": 1, "character": " ", "wealth": 3}], "non-empty name"),
        ([{"chapter": 1, "character": 7, "wealth": 3}], "non-empty name"),
        ([{"chapter": 1, "character": "A", "wealth": 3, "B": 4}], "mixes long and wide"),
        ([{"chapter": 4}], "has no characters"),
        ([{"chapter": 1, "A": 2}, {"chapter": 1, "character": "A", "wealth": 3}], "duplicate wealth for 'A' in chapter 1"),
    ],
)
def test_bad_rows_are_rejected_with_a_clear_message(rows, needle):
    with pytest.raises(WealthDataError) as exc:
        normalise_wealth_rows(rows)
    assert needle in str(exc.value)
    assert isinstance(exc.value, ValueError)


def test_plot_rejects_bad_rows_before_writing(tmp_path):
    out = tmp_path / "x.png"
    with pytest.raises(WealthDataError, match="row 1"):
        plot_wealth([{"chapter": 1, "A": 2}, "oops"], str(out))  # type: ignore[list-item]  # a bad row on purpose
    assert not out.exists()


def test_moving_average_is_centred_and_shrinks_at_the_ends():
    assert moving_average([1, 2, 3, 4, 5], 3) == [1.5, 2.0, 3.0, 4.0, 4.5]
    assert moving_average([1, 2, 3], 1) == [1, 2, 3]
    assert moving_average([0, 0, 10, 0, 0], 5) == pytest.approx([10 / 3, 2.5, 2.0, 2.5, 10 / 3])
    assert moving_average([], 5) == []
    with pytest.raises(ValueError):
        moving_average([1], 0)
