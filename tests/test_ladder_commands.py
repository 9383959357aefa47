"""The ladder's steps are written in three places: the commands docs/LADDER.md gives a reader,
the Makefile's `make ladder` (which makes that page's results table), and benchmarks/gpt.py's
SMALL and BABY (which `make bench` times). A step changed in one place only would give a table,
or a benchmark, of another step than the page shows: each must list the same -S overrides."""

from __future__ import annotations

import re

import pytest

from benchmarks.gpt import BABY, SMALL
from testbed import REPO_ROOT

OVERRIDE = re.compile(r"-S\s+([\w.]+)=(\S+)")


def joined(text: str) -> str:
    """Shell and make lines continued with a backslash, each as one line."""
    return re.sub(r"\\\n\s*", " ", text)


def overrides(line: str) -> dict[str, str]:
    found = OVERRIDE.findall(line)
    assert len({name for name, _ in found}) == len(found), f"a param set twice: {line}"
    return dict(found)


def makefile_steps() -> dict[str, dict[str, str]]:
    """The -S overrides of each `$(LADDER_RUN) -n <step> ...` line, variables expanded."""
    text = joined((REPO_ROOT / "Makefile").read_text())
    variables = dict(re.findall(r"^(SMALL_GPT|BABY_GPT) := (.*)$", text, re.MULTILINE))
    steps = {}
    for name, rest in re.findall(r"^\t\$\(LADDER_RUN\) -n (\S+)(.*)$", text, re.MULTILINE):
        for variable, value in variables.items():
            rest = rest.replace(f"$({variable})", value)
        steps[name] = overrides(rest)
    return steps


def page_steps() -> dict[str, dict[str, str]]:
    """The -S overrides of each `dvc exp run -n <step>` in docs/LADDER.md's commands; a line
    that writes ``...`` takes the step before's overrides, as the page's reader does."""
    text = joined((REPO_ROOT / "docs/LADDER.md").read_text())
    steps: dict[str, dict[str, str]] = {"bigram": {}}  # `dvc repro`: today's defaults
    before: dict[str, str] = {}
    for name, rest in re.findall(r"^dvc exp run -n (\S+)(.*)$", text, re.MULTILINE):
        steps[name] = {**before, **overrides(rest)} if " ... " in f"{rest} " else overrides(rest)
        before = steps[name]
    return steps


def test_the_page_the_makefile_and_the_benchmarks_run_the_same_steps():
    made, shown = makefile_steps(), page_steps()
    assert set(made) == {"bigram", "small-gpt", "baby-gpt", "baby-gpt-cosine"}
    # Every step make ladder runs is on the page, with the same overrides; the page's full GPT
    # is left to a GPU (`make gpu-check`).
    assert {name: shown[name] for name in made} == made
    assert set(shown) - set(made) == {"full-gpt"}
    assert made["small-gpt"] == SMALL
    assert made["baby-gpt"] == BABY
    assert made["baby-gpt-cosine"] == {
        **BABY,
        "train.lr_schedule": "cosine",
        "train.warmup_iters": "100",
    }


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("-S model.type=gpt \\\n  -S train.lr=1e-3", {"model.type": "gpt", "train.lr": "1e-3"}),
        ("--temp -f", {}),
    ],
)
def test_overrides_are_read_across_continued_lines(line, expected):
    assert overrides(joined(line)) == expected
