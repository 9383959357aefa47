"""The next-character heatmap in any script: each character's own glyph when an installed font
has it, else its code point; the most frequent characters of a large vocabulary; a picture
that fits a page, and the same bytes for an ASCII corpus whatever fonts are installed.

CI installs a CJK font (.ci/run: Debian's fonts-noto-cjk). The tests that need one fail, not
skip, on a machine without it, saying so.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from matplotlib import font_manager
from matplotlib.ft2font import FT2Font
from PIL import Image

from pipeline.lm import heatmap
from pipeline.lm.heatmap import (
    MAX_LABELLED,
    base_face,
    char_label,
    heatmap_figure,
    label_font,
    most_frequent,
    plot_next_char_probs,
)

REPO = Path(__file__).resolve().parents[1]
# The opening of the Analects, as a user's own text would have it (two kinds of punctuation).
ANALECTS = "子曰：学而时习之，不亦说乎？有朋自远方来，不亦乐乎？人不知而不愠，不亦君子乎？\n"
# Assigned, printable characters of scripts few machines have a font for, and matplotlib's
# Last Resort font draws only as placeholders.
RARE_CHARS = ["\U0001e900", "\U00016a40", "\U00011d00", "\U0001e2c0"]  # Adlam, Mro, ...
NEEDS_CJK_FONT = (
    "no installed font draws 学 (U+5B66): install one as .ci/run does for CI "
    "(apt-get install fonts-noto-cjk)"
)


def glyph_in_installed_fonts(char: str) -> bool:
    """Whether any installed font file (every face of it) maps char to a glyph."""
    for path in font_manager.findSystemFonts():
        try:
            faces = FT2Font(path).num_faces
            if any(FT2Font(path, face_index=i).get_char_index(ord(char)) for i in range(faces)):
                return True
        except (OSError, RuntimeError):
            continue
    return False


def require_cjk_font() -> None:
    if not glyph_in_installed_fonts("学"):
        pytest.fail(NEEDS_CJK_FONT, pytrace=False)


def char_no_installed_font_has() -> str:
    for char in RARE_CHARS:
        if not glyph_in_installed_fonts(char):
            return char
    pytest.fail(f"every one of {RARE_CHARS} has a font here: add a rarer character")


def drawing_file(font: font_manager.FontProperties, char: str) -> str | None:
    """The font file matplotlib's fallback draws char from: the first family that has it."""
    if font.get_file():
        paths = [font.get_file()]
    else:
        paths = [
            font_manager.findfont(font_manager.FontProperties(family=family))
            for family in font.get_family()
        ]
    for path in paths:
        if FT2Font(str(path), face_index=getattr(path, "face_index", 0)).get_char_index(ord(char)):
            return str(path)
    return None


def random_tables(size: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return tuple(rng.dirichlet(np.full(size, 0.1), size=size) for _ in range(2))


def plot(path: Path, chars: list[str], frequencies: np.ndarray, caplog) -> Image.Image:
    """Plot random tables over chars; fail on any warning ("Glyph ... missing" among them)."""
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        plot_next_char_probs(*random_tables(len(chars)), chars, frequencies, path)
    assert [str(w.message) for w in caught] == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    with Image.open(path) as image:
        image.load()
    return image


def test_labels_are_characters_dejavu_draws_else_code_points():
    faces = [base_face()]
    assert [char_label(c, faces) for c in "aZ;éΩж"] == list("aZ;éΩж")
    assert [char_label(c, faces) for c in "\n \t"] == ["\\n", "␣", "\\t"]
    # DejaVu Sans has no CJK; a carriage return and a zero-width space print nothing; a
    # private-use character means something only to its own font.
    assert [char_label(c, faces) for c in "一\r\u200b\ue000"] == [
        "U+4E00",
        "U+000D",
        "U+200B",
        "U+E000",
    ]


def test_a_vocabulary_dejavu_draws_is_drawn_in_matplotlibs_own_file_alone():
    # What no font is asked for (a carriage return, a private-use character) changes nothing.
    font, faces = label_font(list("\n !$&',-.3:;?ABCXYZabcxyzéΩ\r\ue000"))
    assert font.get_file() == str(heatmap.BASE_FONT) and faces == [base_face()]


def test_a_chinese_vocabulary_is_labelled_with_its_own_characters(tmp_path, caplog):
    require_cjk_font()
    missing = char_no_installed_font_has()
    chars = sorted(set(ANALECTS)) + ["\ue000", missing]
    figure = heatmap_figure(*random_tables(len(chars)), chars, np.ones(len(chars)))
    expected = ["\\n" if c == "\n" else "U+E000" if c == "\ue000" else c for c in chars[:-1]] + [
        f"U+{ord(missing):04X}"
    ]
    for axis in figure.axes[:2]:
        for ticks in (axis.get_xticklabels(), axis.get_yticklabels()):
            assert [t.get_text() for t in ticks] == expected
            assert min(t.get_fontsize() for t in ticks) >= 8
    # Each character comes from an installed font the labels' fallback list names, the
    # ideographs not from DejaVu Sans.
    font = figure.axes[0].get_yticklabels()[0].get_fontproperties()
    for char in set(ANALECTS) - {"\n"}:
        assert drawing_file(font, char), char
    assert "DejaVu" not in drawing_file(font, "学")
    # Drawn and saved: matplotlib warns of any glyph none of the label's fonts has.
    image = plot(tmp_path / "probs.png", chars, np.ones(len(chars)), caplog)
    assert image.size == (1200, 2300)  # font sizes in points are at the saved size


def test_a_large_cjk_vocabulary_plots_its_most_frequent_characters(tmp_path, caplog):
    chars = ["\n", "。"] + [chr(0x4E00 + i) for i in range(298)]
    frequencies = np.arange(len(chars))[::-1]
    image = plot(tmp_path / "probs.png", chars, frequencies, caplog)
    assert image.text["Title"] == (
        f"P(next | current) for the {MAX_LABELLED} most frequent of 300 characters"
    )
    assert image.size[0] <= 1200


def test_a_small_vocabulary_shows_every_character(tmp_path, caplog):
    chars = sorted(set("To be, or not to be: that is the question.\n"))
    image = plot(tmp_path / "probs.png", chars, np.ones(len(chars)), caplog)
    assert image.text["Title"] == f"P(next | current) for all {len(chars)} characters"


def test_most_frequent_keeps_vocabulary_order_and_all_of_a_small_vocabulary():
    assert most_frequent(np.array([5, 1, 9, 1, 7]), 3).tolist() == [0, 2, 4]
    # Ties go to the earlier character, so the picture is the same on every run.
    assert most_frequent(np.array([1, 2, 2, 2, 0]), 2).tolist() == [1, 2]
    assert most_frequent(np.array([3, 0, 1]), 80).tolist() == [0, 1, 2]


# In a fresh process: matplotlib reads its font list once, from its cache, at import. Plots
# the vocabulary of argv[1] to argv[2] unless that is "-"; prints the font families found for
# 学 and its label.
PLOT_IN_A_PROCESS = """
import sys
from pathlib import Path
import numpy as np
from pipeline.lm.heatmap import char_label, label_font, plot_next_char_probs
if sys.argv[2] != "-":
    chars = sorted(set(Path(sys.argv[1]).read_text(encoding="utf-8")))
    rng = np.random.default_rng(0)
    tables = [rng.dirichlet(np.full(len(chars), 0.1), size=len(chars)) for _ in range(2)]
    plot_next_char_probs(*tables, chars, np.ones(len(chars)), Path(sys.argv[2]))
font, faces = label_font(["学"])
print(font.get_family(), char_label("学", faces))
"""


def start_plot(text: Path, png: str, config: Path, system_fonts: bool) -> subprocess.Popen:
    """PLOT_IN_A_PROCESS for text, with matplotlib's font cache in config; system_fonts=False
    as on a machine with no fonts installed besides matplotlib's own."""
    env = {**os.environ, "MPLCONFIGDIR": str(config)}
    env.pop("MPL_IGNORE_SYSTEM_FONTS", None)
    if not system_fonts:
        env["MPL_IGNORE_SYSTEM_FONTS"] = "1"
    command = [sys.executable, "-c", PLOT_IN_A_PROCESS, str(text), png]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)


def families_found(process: subprocess.Popen) -> str:
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0
    return out


def test_the_shakespeare_picture_is_the_same_bytes_with_or_without_a_cjk_font(
    tmp_path, shakespeare_corpus
):
    """The evaluate stage's PNG is a DVC output: dvc.lock must hold on either machine."""
    require_cjk_font()
    bare, fonts = tmp_path / "bare.png", tmp_path / "fonts.png"
    processes = [
        start_plot(shakespeare_corpus, str(bare), tmp_path / "bare", system_fonts=False),
        start_plot(shakespeare_corpus, str(fonts), tmp_path / "fonts", system_fonts=True),
    ]
    found = [families_found(process) for process in processes]
    # The two machines differ as meant: only one can label a Chinese text with its characters.
    assert "CJK" not in found[0] and found[0].endswith(" U+5B66\n")
    assert "CJK" in found[1] and found[1].endswith(" 学\n")
    assert bare.read_bytes() == fonts.read_bytes()


def test_a_font_installed_after_matplotlibs_cache_was_built_is_found(tmp_path):
    """matplotlib rebuilds its font cache only for a new matplotlib version."""
    require_cjk_font()
    config = tmp_path / "mplconfig"
    # The cache is written without the system's fonts, as before `apt-get install`.
    families_found(start_plot(tmp_path, "-", config, system_fonts=False))
    cache = config / f"fontlist-v{font_manager.FontManager.__version__}.json"
    assert "CJK" not in cache.read_text()
    assert "CJK" in families_found(start_plot(tmp_path, "-", config, system_fonts=True))
