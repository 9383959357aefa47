"""The next-character heatmap in any script: labels the font can draw, the top characters."""

from __future__ import annotations

import logging
import warnings

import numpy as np
from PIL import Image

from pipeline.heatmap import (
    MAX_LABELLED,
    char_label,
    label_font,
    most_frequent,
    plot_next_char_probs,
)


def test_labels_are_characters_the_font_draws_else_code_points():
    _, glyphs = label_font()
    assert [char_label(c, glyphs) for c in "aZ;é"] == list("aZ;é")
    assert [char_label(c, glyphs) for c in "\n \t"] == ["\\n", "␣", "\\t"]
    # DejaVu Sans Mono has no CJK; a carriage return and a zero-width space print nothing.
    assert [char_label(c, glyphs) for c in "一鿿\r\u200b"] == [
        "U+4E00",
        "U+9FFF",
        "U+000D",
        "U+200B",
    ]
    assert char_label("\U0001f600", glyphs) == "U+1F600"


def test_most_frequent_keeps_vocabulary_order_and_all_of_a_small_vocabulary():
    assert most_frequent(np.array([5, 1, 9, 1, 7]), 3).tolist() == [0, 2, 4]
    # Ties go to the earlier character, so the picture is the same on every run.
    assert most_frequent(np.array([1, 2, 2, 2, 0]), 2).tolist() == [1, 2]
    assert most_frequent(np.array([3, 0, 1]), 80).tolist() == [0, 1, 2]


def plot(tmp_path, chars: list[str], frequencies: np.ndarray, caplog) -> str:
    """Plot a random table over chars; fail on any warning; return the PNG's title."""
    rng = np.random.default_rng(0)
    learned = rng.dirichlet(np.ones(len(chars)), size=len(chars))
    counted = rng.dirichlet(np.ones(len(chars)), size=len(chars))
    path = tmp_path / "probs.png"
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        plot_next_char_probs(learned, counted, chars, frequencies, path)
    assert [str(w.message) for w in caught] == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 2000
        return image.text["Title"]


def test_a_large_cjk_vocabulary_plots_its_most_frequent_characters_without_warnings(
    tmp_path, caplog
):
    chars = ["\n", "。"] + [chr(0x4E00 + i) for i in range(298)]
    frequencies = np.arange(len(chars))[::-1]
    title = plot(tmp_path, chars, frequencies, caplog)
    assert title == f"P(next | current) for the {MAX_LABELLED} most frequent of 300 characters"


def test_a_small_vocabulary_shows_every_character(tmp_path, caplog):
    chars = sorted(set("To be, or not to be: that is the question.\n"))
    title = plot(tmp_path, chars, np.ones(len(chars)), caplog)
    assert title == f"P(next | current) for all {len(chars)} characters"
