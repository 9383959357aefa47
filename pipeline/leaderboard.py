"""The leaderboard: every evaluated training run in the MLflow store, of every model type, best
val loss first, as one Markdown table.

    python -m pipeline.leaderboard                        # print it
    python -m pipeline.leaderboard --output leaderboard.md  # and write it to a file
    python -m pipeline.leaderboard --into docs/LADDER.md    # replace the table in a page
    make leaderboard
    make ladder                                           # run the ladder, then --into

The store is the pipeline's (``mlflow.db`` at the repository root, or ``$MLFLOW_TRACKING_URI``);
every experiment in it is read. A row is a FINISHED training run that the evaluate stage has
given its exact losses: the run's name (the DVC experiment's), the model and its parameter count,
the params that differ between the ladder's steps, the exact train and val loss, val bits per
character, the training's wall time and the run's page in MLflow's UI. Runs still training,
failed or killed are left out.

``--into`` replaces what lies between the lines ``<!-- leaderboard -->`` and
``<!-- /leaderboard -->`` of a Markdown page, without the run-page column: a page kept in git is
read by people who do not have the store those links open.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.cli import stage_entry_point
from pipeline.errors import PipelineError
from pipeline.files import atomic_open
from pipeline.lm.sizes import GPTConfig, parameter_count

if TYPE_CHECKING:
    from mlflow.entities import Run

PAGE_COLUMN = "run page"
COLUMNS = (
    "#",
    "run",
    "model",
    "parameters",
    "lr",
    "steps",
    "batch x block",  # processes x batch x block under torchrun
    "train loss",
    "val loss",
    "val bits/char",
    "training wall",
    PAGE_COLUMN,
)
# The lines between which --into writes the table.
START_MARKER, END_MARKER = "<!-- leaderboard -->", "<!-- /leaderboard -->"
# Numbers are right-aligned, so that their digits line up.
NUMERIC = {"#", "parameters", "steps", "train loss", "val loss", "val bits/char", "training wall"}
# The metrics the evaluate stage adds to a training run: a run without them was not evaluated.
EVALUATED = ("train_loss", "val_loss", "val_bits_per_char", "uniform_loss")
# The params a row shows; a GPT's sizes too. A run logged without them is not the pipeline's.
SHOWN_PARAMS = ("train.lr", "train.max_iters", "train.batch_size", "train.block_size")
GPT_PARAMS = ("model.n_layer", "model.n_head", "model.n_embd")


@dataclass(frozen=True)
class Entry:
    """One training run, as the leaderboard shows it."""

    run_name: str
    model: str
    parameters: int
    lr: str
    steps: str
    batch: str
    train_loss: float
    val_loss: float
    val_bits: float
    wall_s: float
    page: str

    def cells(self, rank: int) -> list[str]:
        return [
            str(rank),
            self.run_name,
            self.model,
            f"{self.parameters:,}",
            self.lr,
            self.steps,
            self.batch,
            f"{self.train_loss:.4f}",
            f"**{self.val_loss:.4f}**",
            f"{self.val_bits:.3f}",
            wall_time(self.wall_s),
            f"[open]({self.page})",
        ]


def model_description(params: dict[str, str], vocab_size: int) -> tuple[str, int]:
    """'bigram', or 'gpt 4L 4H 128E' (dropout when set), and the parameter count."""
    if params.get("model.type", "bigram") != "gpt":
        return "bigram", vocab_size * vocab_size
    config = GPTConfig(
        vocab_size=vocab_size,
        block_size=int(params["train.block_size"]),
        n_layer=int(params["model.n_layer"]),
        n_head=int(params["model.n_head"]),
        n_embd=int(params["model.n_embd"]),
    )
    name = f"gpt {config.n_layer}L {config.n_head}H {config.n_embd}E"
    dropout = float(params.get("model.dropout", "0"))
    if dropout:
        name += f" dropout {dropout:g}"
    return name, parameter_count(config)


def learning_rate(params: dict[str, str]) -> str:
    schedule = params.get("train.lr_schedule", "constant")
    lr = f"{float(params['train.lr']):g}"
    return lr if schedule == "constant" else f"{lr} {schedule}"


def batch_shape(params: dict[str, str]) -> str:
    """'32 x 8' (sequences x block), or '2 x 16 x 64' for 2 processes of 16 sequences each."""
    shape = f"{params['train.batch_size']} x {params['train.block_size']}"
    processes = params.get("train.processes", "1")  # runs logged before the param existed
    return shape if processes == "1" else f"{processes} x {shape}"


def wall_time(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"


def entry(run: Run) -> Entry | None:
    """The run's row, or None for a run the evaluate stage has not given its losses."""
    from pipeline.tracking.store import run_page

    metrics, params = run.data.metrics, run.data.params
    needed = SHOWN_PARAMS + (GPT_PARAMS if params.get("model.type") == "gpt" else ())
    if not all(name in metrics for name in EVALUATED) or not all(p in params for p in needed):
        return None
    vocab_size = round(math.exp(metrics["uniform_loss"]))
    model, parameters = model_description(params, vocab_size)
    counts = params.get("train.method") == "counts"
    return Entry(
        run_name=run.info.run_name or run.info.run_id,
        model=model,
        parameters=parameters,
        lr="L-BFGS" if counts else learning_rate(params),
        steps=params["train.max_iters"],
        batch="all" if counts else batch_shape(params),
        train_loss=metrics["train_loss"],
        val_loss=metrics["val_loss"],
        val_bits=metrics["val_bits_per_char"],
        wall_s=((run.info.end_time or run.info.start_time) - run.info.start_time) / 1000,
        page=run_page(run.info.experiment_id, run.info.run_id)[0],
    )


def leaderboard_entries() -> list[Entry]:
    """Every evaluated training run of every experiment in the store, lowest val loss first."""
    from mlflow import MlflowClient

    from pipeline.tracking.store import use_store

    use_store()
    client = MlflowClient()
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        experiment_ids,
        filter_string="tags.stage = 'train' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time ASC"],
    )
    entries = [found for found in map(entry, runs) if found is not None]
    return sorted(entries, key=lambda e: e.val_loss)


def markdown_table(entries: list[Entry], links: bool = True) -> str:
    """The table; without links, without the run-page column (the last)."""
    width = len(COLUMNS) if links else COLUMNS.index(PAGE_COLUMN)
    rule = ["---:" if column in NUMERIC else "---" for column in COLUMNS]
    rows = (e.cells(rank) for rank, e in enumerate(entries, 1))
    lines = [COLUMNS, rule, *rows]
    return "".join("| " + " | ".join(line[:width]) + " |\n" for line in lines)


def write_into(page: Path, table: str) -> None:
    """Replace the lines between the page's markers with the table, atomically."""
    try:
        text = page.read_text(encoding="utf-8")
    except OSError as error:
        raise PipelineError(
            f"cannot read {page} ({error.strerror}): pass an existing page to --into"
        ) from None
    before, start, rest = text.partition(f"{START_MARKER}\n")
    _, end, after = rest.partition(f"{END_MARKER}\n")
    if not start or not end:
        raise PipelineError(
            f"{page} has no lines {START_MARKER} and {END_MARKER}: put them around the table "
            "that --into replaces"
        )
    with atomic_open(page, encoding="utf-8") as handle:
        handle.write(f"{before}{START_MARKER}\n{table}{END_MARKER}\n{after}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.leaderboard", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--output", type=Path, help="also write the table to this Markdown file")
    parser.add_argument(
        "--into",
        type=Path,
        metavar="PAGE",
        help=f"replace the table between {START_MARKER} and {END_MARKER} in this Markdown page "
        "(without the run-page links)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    entries = leaderboard_entries()
    if not entries:
        print("no evaluated training run in the store yet: run `dvc repro` first")
        return
    table = markdown_table(entries)
    print(table, end="")
    if args.output:
        with atomic_open(args.output) as handle:
            handle.write(table)
    if args.into:
        write_into(args.into, markdown_table(entries, links=False))


if __name__ == "__main__":
    stage_entry_point(main)()
