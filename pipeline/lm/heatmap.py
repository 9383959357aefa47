"""Heatmaps of P(next | current) that stay readable for any vocabulary, in any script.

Tick labels are drawn in matplotlib's own copy of DejaVu Sans. A character it has no glyph for
is drawn in an installed font that has one, through matplotlib's per-glyph font fallback (a
list of families); only a character no installed font can draw, or one that does not print (a
control, format or private-use character), is labelled by its code point, U+E000. So
matplotlib never warns "Glyph ... missing" and no label is an empty box. A vocabulary DejaVu
Sans draws entirely (Tiny Shakespeare's) never looks at the installed fonts: its picture is the
same bytes on every machine, which keeps the evaluate stage's output reproducible from dvc.lock.

Above MAX_LABELLED characters a cell per character pair would be smaller than its label: the
picture then shows the MAX_LABELLED most frequent characters and says so in its title.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # Files only: no display on servers and CI.
import matplotlib.pyplot as plt
import numpy as np
from matplotlib import font_manager, ft2font
from matplotlib.ft2font import FT2Font

from pipeline.files import atomic_path

# 80 labels at LABEL_POINTS fill the 10-inch square of each panel; Tiny Shakespeare's 65 fit.
MAX_LABELLED = 80
SPECIAL_LABELS = {"\n": "\\n", " ": "␣", "\t": "\\t"}
# 1200 pixels wide, to fit a browser page (DVC's `plots show`); the panels are stacked so that
# each is as wide as the page allows.
FIGURE_INCHES = (12.0, 23.0)
DPI = 100
LABEL_POINTS = 9.0  # 12.5 pixels at DPI, a cell's height when 80 characters are shown
# The one file every machine has, whatever fonts are installed: matplotlib ships it.
BASE_FONT = Path(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")
BASE_FAMILY = "DejaVu Sans"


@functools.cache
def face_glyphs(path: str, face_index: int) -> FT2Font:
    """The font face at path (a face of a .ttc collection), opened once per process."""
    return FT2Font(path, face_index=face_index)


def has_glyph(face: FT2Font, char: str) -> bool:
    """Whether the face maps char to a glyph (index 0 is the missing-glyph box)."""
    return face.get_char_index(ord(char)) != 0


@functools.cache
def base_face() -> FT2Font:
    return face_glyphs(str(BASE_FONT), 0)


def add_fonts_installed_since_the_cache() -> None:
    """Make fonts installed after matplotlib's font cache was written known to it.

    matplotlib rebuilds its cache (~/.cache/matplotlib) only when its own version changes, so a
    font installed later (apt-get install fonts-noto-cjk) is otherwise never found. Listing the
    system's font files takes about 10 ms; reading the new ones happens once per process.
    """
    known = {entry.fname for entry in font_manager.fontManager.ttflist}
    for path in sorted(set(font_manager.findSystemFonts()) - known):
        try:
            font_manager.fontManager.addfont(path)
        except Exception:  # noqa: BLE001 - matplotlib skips unreadable files the same way.
            continue


def is_regular_installed_text_face(entry: font_manager.FontEntry) -> bool:
    """A regular, upright, scalable face of a font installed on the system.

    matplotlib's own other fonts are for mathematics (Computer Modern, STIX: glyphs at code
    points of their own) or a last resort whose glyphs are placeholders, not characters. A
    bitmap-only face (a colour emoji font) cannot be drawn at the labels' size. Only families
    with a regular face: matplotlib warns when it must pick another weight.
    """
    # A weight is a name ("bold") or a number (700); the names map to numbers.
    weight = entry.weight
    if isinstance(weight, str):
        weight = font_manager.weight_dict.get(weight, weight)
    return (
        not Path(entry.fname).is_relative_to(matplotlib.get_data_path())
        and (entry.style, entry.variant, entry.stretch, weight)
        == ("normal", "normal", "normal", 400)
        and ft2font.FaceFlags.SCALABLE in face_glyphs(entry.fname, entry.index).face_flags
    )


def regular_faces() -> dict[str, FT2Font]:
    """Each installed family with a regular face: that face."""
    add_fonts_installed_since_the_cache()
    faces: dict[str, FT2Font] = {}
    for entry in font_manager.fontManager.ttflist:
        if entry.name not in faces and is_regular_installed_text_face(entry):
            faces[entry.name] = face_glyphs(entry.fname, entry.index)
    faces.pop(BASE_FAMILY, None)
    return faces


def drawn_from(family: str, face: FT2Font) -> bool:
    """Whether matplotlib draws family from face (it may refuse a system font, as under
    MPL_IGNORE_SYSTEM_FONTS, or prefer another file of the family)."""
    props = font_manager.FontProperties(family=family, size=LABEL_POINTS)
    try:
        path = font_manager.fontManager.findfont(props, fallback_to_default=False)
    except ValueError:
        return False
    return face_glyphs(str(path), getattr(path, "face_index", 0)) is face


def fallback_families(chars: Iterable[str]) -> list[tuple[str, FT2Font]]:
    """Installed font families, with their faces, that together draw as many of chars as any
    fonts can.

    Greedy: the family drawing most of the characters still missing, then the next; ties go
    to the alphabetically first family, so the choice is the same on every run.
    """
    candidates = dict(sorted(regular_faces().items()))
    missing = set(chars)
    chosen = []
    while missing and candidates:
        coverage = {
            family: {c for c in missing if has_glyph(face, c)}
            for family, face in candidates.items()
        }
        best = max(candidates, key=lambda family: len(coverage[family]))
        if not coverage[best]:
            break
        face = candidates.pop(best)
        if drawn_from(best, face):
            chosen.append((best, face))
            missing -= coverage[best]
    return chosen


def printable_label(char: str) -> str:
    return SPECIAL_LABELS.get(char, char)


def label_font(chars: list[str]) -> tuple[font_manager.FontProperties, list[FT2Font]]:
    """The tick labels' font for chars and the faces it draws from, first to last.

    DejaVu Sans alone, from matplotlib's own file, when it draws every label; else DejaVu Sans
    followed by the installed families that draw the rest (matplotlib's font fallback).
    """
    printable = [label for label in map(printable_label, chars) if label.isprintable()]
    needed = {c for label in printable for c in label if not has_glyph(base_face(), c)}
    if not needed:
        return font_manager.FontProperties(fname=BASE_FONT, size=LABEL_POINTS), [base_face()]
    fallbacks = fallback_families(sorted(needed))
    families = [BASE_FAMILY, *(family for family, _ in fallbacks)]
    font = font_manager.FontProperties(family=families, size=LABEL_POINTS)
    return font, [base_face(), *(face for _, face in fallbacks)]


def char_label(char: str, faces: list[FT2Font]) -> str:
    """The character itself when one of the faces can draw it, else its code point."""
    label = printable_label(char)
    if label.isprintable() and all(any(has_glyph(f, c) for f in faces) for c in label):
        return label
    return f"U+{ord(char):04X}"


def most_frequent(frequencies: np.ndarray, limit: int) -> np.ndarray:
    """Indices of the `limit` most frequent characters, in vocabulary order (all if fewer).

    Ties go to the earlier character (stable sort), so the choice is the same on every run.
    """
    if len(frequencies) <= limit:
        return np.arange(len(frequencies))
    return np.sort(np.argsort(-np.asarray(frequencies), kind="stable")[:limit])


def heatmap_figure(
    learned: np.ndarray,
    counted: np.ndarray,
    chars: list[str],
    frequencies: np.ndarray,
    max_labelled: int = MAX_LABELLED,
) -> plt.Figure:
    """Two heatmaps of P(next | current), learned by the model and counted in train, stacked.

    frequencies[i] is how often chars[i] occurs; it picks the characters shown when there are
    more than max_labelled. The figure's suptitle says which are shown.
    """
    shown = most_frequent(frequencies, max_labelled)
    shown_chars = [chars[i] for i in shown]
    font, faces = label_font(shown_chars)
    labels = [char_label(char, faces) for char in shown_chars]
    if len(shown) < len(chars):
        subset = f"the {len(shown)} most frequent of {len(chars):,} characters"
    else:
        subset = f"all {len(chars)} characters"
    figure, axes = plt.subplots(2, 1, figsize=FIGURE_INCHES)
    # Fixed margins, room for code-point labels: constrained_layout's extra drawing passes
    # doubled the stage's plotting time.
    figure.subplots_adjust(left=0.09, right=0.93, bottom=0.035, top=0.96, hspace=0.1)
    figure.suptitle(f"P(next | current) for {subset}", fontsize=14)
    for axis, table, panel in (
        (axes[0], learned, "learned: softmax of the embedding table"),
        (axes[1], counted, "counted: bigram frequencies in the train split"),
    ):
        image = axis.imshow(table[np.ix_(shown, shown)], cmap="Blues", vmin=0.0, vmax=1.0)
        axis.set_title(panel, fontsize=12)
        axis.set_xticks(range(len(labels)), labels, fontproperties=font)
        # Code points (U+4E00) side by side would overlap unless turned upright; characters
        # stay as they are read.
        for tick in axis.get_xticklabels():
            tick.set_rotation(90 if len(tick.get_text()) > 2 else 0)
        axis.set_yticks(range(len(labels)), labels, fontproperties=font)
        axis.set_xlabel("next character", fontsize=11)
        axis.set_ylabel("current character", fontsize=11)
    figure.colorbar(image, ax=axes, shrink=0.5, fraction=0.03, pad=0.02, label="probability")
    return figure


def plot_next_char_probs(
    learned: np.ndarray,
    counted: np.ndarray,
    chars: list[str],
    frequencies: np.ndarray,
    path: Path,
    max_labelled: int = MAX_LABELLED,
) -> None:
    """heatmap_figure, saved as a PNG at path (atomically)."""
    figure = heatmap_figure(learned, counted, chars, frequencies, max_labelled)
    title = figure.get_suptitle()
    try:
        with atomic_path(path) as tmp_path:
            # The title goes into the PNG's metadata too, for viewers that list it (and tests).
            figure.savefig(tmp_path, format="png", dpi=DPI, metadata={"Title": title})
    finally:
        plt.close(figure)
