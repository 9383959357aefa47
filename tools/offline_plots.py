"""`make plots`: DVC's plots page with vega inlined, so that its charts draw without a network.

DVC's own page loads vega, vega-lite and vega-embed from cdn.jsdelivr.net: offline it draws no
loss chart at all. This writes a page template for `dvc plots --html-template` that carries the
three libraries inline (vl-convert-python's bundle, built without a network) and no `{scripts}`
placeholder, the one DVC fills with its CDN tags; then it runs dvc with it:

    python tools/offline_plots.py show              # dvc plots show, offline
    python tools/offline_plots.py diff main <exp>   # dvc plots diff main <exp>, offline

The page opens from dvc_plots/index.html like DVC's own; images shrink to the page's width.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# In .dvc/tmp (git-ignored): a build product of the installed vl-convert-python, 1 MB.
PAGE_TEMPLATE = REPO_ROOT / ".dvc" / "tmp" / "offline_plots.html"
# The vega-lite DVC's templates and .dvc/plots/bigram_loss.json declare ($schema v5).
VEGA_LITE_VERSION = "5.21"
# DVC replaces these anywhere in the page, so the bundle must not contain them; "</script"
# would end the bundle's script element early.
RESERVED = ("{plot_divs}", "{scripts}", "{refresh_tag}", "</script")

PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
{refresh_tag}
<title>DVC plots (offline)</title>
<script>
VEGA_BUNDLE
</script>
<style>
  body { font-family: sans-serif; margin: 16px; }
  /* DVC sets one revision's image per inline block, all on one line: let each block wrap and
     shrink to the page, so that a wide heatmap fits the window. */
  div[style*="nowrap"] { white-space: normal !important; }
  div[style*="inline-block"] { max-width: calc(100% - 16px); box-sizing: border-box; }
  img { max-width: 100%; height: auto; }
</style>
</head>
<body>
{plot_divs}
</body>
</html>
"""


class OfflinePlotsError(Exception):
    """What stops the page from being written: the message says how to fix it."""


def vega_bundle() -> str:
    """vega, vega-lite and vega-embed in one script that sets window.vegaEmbed."""
    try:
        import vl_convert
    except ImportError as missing:
        raise OfflinePlotsError(
            "vl-convert-python is not installed: run `make install` (it is in the dev extra) "
            "or `pip install vl-convert-python`"
        ) from missing
    return vl_convert.javascript_bundle(vl_version=VEGA_LITE_VERSION)


def page_template(bundle: str) -> str:
    """The page DVC fills: the bundle inline, no script loaded from anywhere."""
    found = [text for text in RESERVED if text in bundle]
    if found:
        raise OfflinePlotsError(
            f"vl-convert-python's bundle contains {found[0]!r}, which would break DVC's page: "
            "install another vl-convert-python version"
        )
    return PAGE.replace("VEGA_BUNDLE", bundle)


def write_page_template(path: Path = PAGE_TEMPLATE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(page_template(vega_bundle()), encoding="utf-8")
    partial.replace(path)
    return path


def main(args: list[str]) -> int:
    """Run `dvc plots <args>` with the offline page; its exit status."""
    try:
        template = write_page_template()
    except OfflinePlotsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    command = ["dvc", "plots", *(args or ["show"]), "--html-template", str(template)]
    return subprocess.run(command).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
