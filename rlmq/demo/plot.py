"""Plot the Monte Cristo demo's result: each character's wealth (1–10) chapter by chapter.

``plot_wealth(rows, "wealth.png")`` accepts rows in either of two shapes (both may be mixed):

* long: ``{"chapter": 1, "character": "Edmond Dantès", "wealth": 3}`` (an ``"event"`` text may
  ride along: the demo's rows carry one; it is not plotted)
* wide: ``{"chapter": 1, "Dantès": 3, "Danglars": 5, ...}``

matplotlib is an optional dependency (``pip install 'rlmq[demo]'``); it is imported only when
a plot is drawn, with the Agg backend's canvas (no display, no global pyplot state, safe in a
worker thread).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # matplotlib is optional: imported for real only to draw
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

__all__ = ["WealthDataError", "moving_average", "normalise_wealth_rows", "plot_wealth"]

DEFAULT_TITLE = "Wealth trajectories — The Count of Monte Cristo"


class WealthDataError(ValueError):
    """Wealth rows that cannot be plotted (the message names the row at fault)."""


def _chapter(value: object, where: str) -> int:
    if isinstance(value, bool):
        raise WealthDataError(f"{where}: chapter must be a whole number, got {value!r}")
    if isinstance(value, numbers.Integral):
        chapter = int(value)
    elif isinstance(value, numbers.Real) and float(value).is_integer():
        chapter = int(float(value))
    elif isinstance(value, str) and value.strip().lstrip("+").isdigit():
        chapter = int(value.strip())
    else:
        raise WealthDataError(f"{where}: chapter must be a whole number, got {value!r}")
    if chapter < 0:
        raise WealthDataError(f"{where}: chapter must not be negative, got {chapter}")
    return chapter


def _wealth(value: object, where: str) -> float:
    if isinstance(value, bool) or value is None:
        raise WealthDataError(f"{where}: wealth must be a number, got {value!r}")
    if isinstance(value, numbers.Real):
        wealth = float(value)
    elif isinstance(value, str):
        try:
            wealth = float(value.strip())
        except ValueError:
            raise WealthDataError(f"{where}: wealth must be a number, got {value!r}") from None
    else:
        raise WealthDataError(f"{where}: wealth must be a number, got {value!r}")
    if not math.isfinite(wealth):
        raise WealthDataError(f"{where}: wealth must be a finite number, got {value!r}")
    return wealth


def normalise_wealth_rows(rows: Iterable[object]) -> dict[str, list[tuple[int, float]]]:
    """``{character: [(chapter, wealth), ...]}``, chapters ascending, characters in order of
    first appearance. Raises :class:`WealthDataError` for a row that is not a dict, lacks a
    chapter, has a non-numeric wealth, an empty character name, or repeats a
    (chapter, character) pair. In wide rows a ``None`` value means "no estimate" and is skipped.
    """
    if isinstance(rows, (str, bytes)) or not hasattr(rows, "__iter__"):
        raise WealthDataError(f"wealth data must be a list of rows (dicts), got {type(rows).__name__}")
    series: dict[str, dict[int, float]] = {}

    def add(character: object, chapter: int, wealth: float, where: str) -> None:
        if not isinstance(character, str) or not character.strip():
            raise WealthDataError(f"{where}: character must be a non-empty name, got {character!r}")
        name = " ".join(character.split())
        points = series.setdefault(name, {})
        if chapter in points:
            raise WealthDataError(f"{where}: duplicate wealth for {name!r} in chapter {chapter}")
        points[chapter] = wealth

    for i, row in enumerate(rows):
        where = f"wealth row {i}"
        if not isinstance(row, dict):
            raise WealthDataError(f"{where}: expected a dict, got {type(row).__name__} {row!r:.80}")
        if "chapter" not in row:
            raise WealthDataError(f"{where}: missing 'chapter' in {row!r:.120}")
        chapter = _chapter(row["chapter"], where)
        if "character" in row or "wealth" in row:  # long shape
            missing = [k for k in ("character", "wealth") if k not in row]
            if missing:
                raise WealthDataError(f"{where}: missing {missing[0]!r} in {row!r:.120}")
            extra = sorted(set(row) - {"chapter", "character", "wealth", "event"})
            if extra:
                raise WealthDataError(
                    f"{where}: mixes long and wide shapes (unexpected keys {extra}); use either "
                    f'{{"chapter", "character", "wealth"[, "event"]}} or {{"chapter", NAME: wealth, ...}}'
                )
            add(row["character"], chapter, _wealth(row["wealth"], where), where)
        else:  # wide shape
            values = {k: v for k, v in row.items() if k != "chapter"}
            if not values:
                raise WealthDataError(f"{where}: chapter {chapter} has no characters")
            for name, value in values.items():
                if value is None:
                    continue
                add(name, chapter, _wealth(value, f"{where} ({name})"), where)

    if not series:
        raise WealthDataError("wealth data is empty: nothing to plot")
    return {name: sorted(points.items()) for name, points in series.items()}


def moving_average(values: list[float], window: int) -> list[float]:
    """Centred moving average; near the ends the window shrinks to the points available."""
    if window < 1:
        raise ValueError(f"smoothing window must be >= 1, got {window}")
    before = (window - 1) // 2
    after = window - 1 - before
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - before): i + after + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def _import_matplotlib() -> tuple[ModuleType, type[Figure], type[FigureCanvasAgg]]:
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "plotting needs matplotlib, which is not installed: pip install 'rlmq[demo]'"
        ) from exc
    return matplotlib, Figure, FigureCanvasAgg


def plot_wealth(
    wealth_data: list[dict[str, Any]],  # JSON rows, checked by normalise_wealth_rows
    path: str,
    *,
    smoothing: int = 5,
    title: str | None = None,
) -> str:
    """Draw one smoothed line per character (raw estimates as faint dots) and save to ``path``.

    The file format follows the extension (``.png`` by default, ``.svg``/``.pdf`` work too).
    Returns ``path`` as a string.
    """
    if isinstance(smoothing, bool) or not isinstance(smoothing, int) or smoothing < 1:
        raise ValueError(f"smoothing must be a whole number >= 1, got {smoothing!r}")
    series = normalise_wealth_rows(wealth_data)
    _matplotlib, Figure, FigureCanvasAgg = _import_matplotlib()
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(12, 6.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours = _colours(len(series))
    all_chapters, all_wealth = [], []
    for (name, points), colour in zip(series.items(), colours, strict=True):
        chapters = [c for c, _ in points]
        wealth = [w for _, w in points]
        all_chapters += chapters
        all_wealth += wealth
        ax.scatter(chapters, wealth, s=16, color=colour, alpha=0.3, linewidths=0, zorder=2)
        ax.plot(chapters, moving_average(wealth, smoothing), color=colour, linewidth=2.2,
                label=name, zorder=3)

    lo, hi = min(all_chapters), max(all_chapters)
    ax.set_xlim(lo - 1, hi + 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    ax.set_ylim(min(0.5, min(all_wealth) - 0.5), max(10.5, max(all_wealth) + 0.5))
    ax.set_yticks(range(1, 11))
    ax.set_xlabel("Chapter")
    ax.set_ylabel("Wealth (1 = destitute, 10 = immensely rich)")
    ax.set_title(DEFAULT_TITLE if title is None else title, fontsize=14)
    ax.grid(True, alpha=0.3)
    note = f"lines: centred moving average of {smoothing} estimates; dots: per-chapter estimates"
    ax.text(1.0, -0.1, note, transform=ax.transAxes, ha="right", va="top", fontsize=8, alpha=0.7)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title="Character")

    out = Path(path)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return str(path)


def _colours(n: int) -> list[tuple[float, float, float, float]]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]
