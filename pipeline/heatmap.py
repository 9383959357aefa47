"""Heatmaps of P(next | current) that stay readable for any vocabulary, in any script.

Tick labels are drawn in one font file, the one matplotlib picks for "monospace" (DejaVu Sans
Mono, shipped with matplotlib). A character that font has no glyph for, or one that does not
print (a control character), is labelled by its code point, U+4E00, so matplotlib never warns
"Glyph ... missing" and no label is an empty box. Above MAX_LABELLED characters a cell per
character pair would be smaller than its label: the picture then shows the MAX_LABELLED most
frequent characters and says so in its title.
"""

from __future__ import annotations

import functools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # Files only: no display on servers and CI.
import matplotlib.pyplot as plt
import numpy as np
from matplotlib import font_manager
from matplotlib.ft2font import FT2Font

from pipeline.files import atomic_path

# 80 labels at 6 pt fill the 11-inch axes; Tiny Shakespeare's 65 characters all fit.
MAX_LABELLED = 80
SPECIAL_LABELS = {"\n": "\\n", " ": "␣", "\t": "\\t"}


@functools.cache
def label_font() -> tuple[font_manager.FontProperties, frozenset[int]]:
    """The tick labels' font and the code points it has glyphs for."""
    path = font_manager.findfont(font_manager.FontProperties(family="monospace"))
    return font_manager.FontProperties(fname=path, size=6), frozenset(FT2Font(path).get_charmap())


def char_label(char: str, glyphs: frozenset[int]) -> str:
    """The character itself when the font can draw it, else its code point."""
    label = SPECIAL_LABELS.get(char, char)
    if label.isprintable() and all(ord(c) in glyphs for c in label):
        return label
    return f"U+{ord(char):04X}"


def most_frequent(frequencies: np.ndarray, limit: int) -> np.ndarray:
    """Indices of the `limit` most frequent characters, in vocabulary order (all if fewer).

    Ties go to the earlier character (stable sort), so the choice is the same on every run.
    """
    if len(frequencies) <= limit:
        return np.arange(len(frequencies))
    return np.sort(np.argsort(-np.asarray(frequencies), kind="stable")[:limit])


def plot_next_char_probs(
    learned: np.ndarray,
    counted: np.ndarray,
    chars: list[str],
    frequencies: np.ndarray,
    path: Path,
    max_labelled: int = MAX_LABELLED,
) -> None:
    """Two heatmaps of P(next | current), learned by the model and counted in train.

    frequencies[i] is how often chars[i] occurs; it picks the characters shown when there are
    more than max_labelled.
    """
    shown = most_frequent(frequencies, max_labelled)
    font, glyphs = label_font()
    labels = [char_label(chars[i], glyphs) for i in shown]
    if len(shown) < len(chars):
        subset = f"the {len(shown)} most frequent of {len(chars):,} characters"
    else:
        subset = f"all {len(chars)} characters"
    # Code points (U+4E00) side by side on the x axis would overlap unless turned upright.
    x_rotation = 90 if max(map(len, labels)) > 2 else 0
    figure, axes = plt.subplots(1, 2, figsize=(22, 11))
    # Fixed margins, room for code-point labels: constrained_layout's extra drawing passes
    # doubled the stage's plotting time.
    figure.subplots_adjust(left=0.04, right=0.99, bottom=0.07, top=0.92, wspace=0.08)
    title = f"P(next | current) for {subset}"
    figure.suptitle(title)
    for axis, table, panel in (
        (axes[0], learned, "learned: softmax of the embedding table"),
        (axes[1], counted, "counted: bigram frequencies in the train split"),
    ):
        image = axis.imshow(table[np.ix_(shown, shown)], cmap="Blues", vmin=0.0, vmax=1.0)
        axis.set_title(panel)
        axis.set_xticks(range(len(labels)), labels, fontproperties=font, rotation=x_rotation)
        axis.set_yticks(range(len(labels)), labels, fontproperties=font)
        axis.set_xlabel("next character")
        axis.set_ylabel("current character")
    figure.colorbar(image, ax=axes, shrink=0.6, fraction=0.03, pad=0.015, label="probability")
    with atomic_path(path) as tmp_path:
        # The title goes into the PNG's metadata too, for viewers that list it (and the tests).
        figure.savefig(tmp_path, format="png", dpi=110, metadata={"Title": title})
    plt.close(figure)
