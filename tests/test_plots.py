"""The charts users read (issue 17): the loss chart of `dvc plots show` sized for reading, train
and val told apart, drawn by vega itself; `make plots` (tools/offline_plots.py) a page that draws
it without a network, in a real headless browser; `dvc plots diff main <exp>` with both curves."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import vl_convert

from testbed import copy_trained_repo, run
from tools import offline_plots

TRAIN_COLOUR, VAL_COLOUR = "#1f5fa8", "#e8590c"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def loss_chart(repo: Path, env: dict, *command: str) -> tuple[dict, list]:
    """The loss chart's vega-lite spec from `dvc plots <command> --json`, and DVC's errors."""
    shown = json.loads(run(["dvc", "plots", *command, "--json"], repo, env).stdout)
    (chart,) = shown["data"]["data/train/loss_curve.csv"]
    return chart["content"], shown.get("errors") or []


def drawn(spec: dict) -> str:
    """The chart as vega draws it (SVG), with the vega-lite the offline page carries."""
    return vl_convert.vegalite_to_svg(spec, vl_version=offline_plots.VEGA_LITE_VERSION)


def line_strokes(svg: str) -> list[str]:
    """The stroke colour of each line vega drew, panel by panel."""
    return re.findall(r'<g class="mark-line role-mark[^"]*"[^>]*><path[^>]*stroke="([^"]+)"', svg)


def texts(svg: str) -> list[str]:
    return re.findall(r"<text[^>]*>([^<]*)</text>", svg)


def test_the_loss_chart_is_wide_and_draws_train_and_val_in_two_colours(trained_repo):
    repo, env = trained_repo
    spec, errors = loss_chart(repo, env, "show")
    assert not errors
    assert [panel["width"] for panel in spec["vconcat"]] == [760, 760]
    svg = drawn(spec)
    # Two panels (all steps; the second half, zoomed), each with a train and a val line.
    assert line_strokes(svg) == [TRAIN_COLOUR, VAL_COLOUR] * 2
    labels = texts(svg)
    assert {"train_loss", "val_loss", "split", "revision", "workspace"} <= set(labels)
    # The y axes start near the losses, not at 0 (the fast run's losses are between 2 and 5).
    y_ticks = [float(t) for t in labels if re.fullmatch(r"\d\.\d+", t)]
    assert y_ticks and min(y_ticks) > 2


def test_the_offline_page_carries_vega_and_loads_no_script(trained_repo, tmp_path):
    repo, env = copy_trained_repo(trained_repo[0], tmp_path / "repo"), trained_repo[1]
    run([sys.executable, "tools/offline_plots.py", "show"], repo, env)
    page = (repo / "dvc_plots/index.html").read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]*\bsrc=", page), "a script loaded from elsewhere"
    assert "window.vegaEmbed=" in page and "vegaEmbed('#data_train_loss_curve_csv', spec)" in page
    assert "next_char_probs.png" in page
    # DVC's own page, for contrast: its vega comes from the web.
    run(["dvc", "plots", "show", "-o", "dvc_page"], repo, env)
    assert "https://cdn.jsdelivr.net/npm/vega@" in (repo / "dvc_page/index.html").read_text()


def test_the_offline_page_draws_the_loss_chart_in_a_browser_without_network(trained_repo, tmp_path):
    # .ci/run installs it, as a user would: a missing browser fails the test rather than skip it.
    assert CHROMIUM is not None, "needs Chromium: apt-get install chromium"
    repo, env = copy_trained_repo(trained_repo[0], tmp_path / "repo"), trained_repo[1]
    run([sys.executable, "tools/offline_plots.py", "show"], repo, env)
    dom = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            # No host resolves: the page gets nothing from any network.
            "--host-resolver-rules=MAP * ~NOTFOUND",
            f"--user-data-dir={tmp_path / 'chromium'}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            (repo / "dvc_plots/index.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    chart = dom.split('<div id="data_train_loss_curve_csv"', 1)[1].split(
        '<div id="data_evaluate', 1
    )[0]
    assert "<svg" in chart and 'class="marks"' in chart, "vega drew nothing"
    assert line_strokes(chart) == [TRAIN_COLOUR, VAL_COLOUR] * 2
    assert {"train_loss", "val_loss"} <= set(texts(chart))


def test_the_offline_page_refuses_a_bundle_that_would_break_dvcs_page():
    for breaking in ("{plot_divs}", "</script>"):
        with pytest.raises(offline_plots.OfflinePlotsError, match=re.escape(breaking[:8])):
            offline_plots.page_template(f"var x = '{breaking}';")
    page = offline_plots.page_template("window.vegaEmbed = 1;")
    assert page.count("{plot_divs}") == 1 and "{scripts}" not in page


@pytest.mark.e2e
def test_plots_diff_of_main_and_an_experiment_draws_both_curves(experiments):
    repo, env, experiment = experiments.repo, experiments.env, experiments.first
    spec, errors = loss_chart(repo, env, "diff", "main", experiment)
    assert not errors
    revisions = {row["rev"] for row in spec["data"]["values"]}
    assert revisions == {"main", experiment}
    svg = drawn(spec)
    # Per panel: main's and the experiment's train and val lines, one dash per revision.
    assert sorted(line_strokes(svg)) == sorted([TRAIN_COLOUR, VAL_COLOUR] * 4)
    assert {"main", experiment} <= set(texts(svg))
