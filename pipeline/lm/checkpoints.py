"""Checkpoints: a training run's whole state at an eval point, so that a killed run goes on exactly.

A checkpoint holds the model's weights, the TrainingState (optimizer, the batches' generator,
torch's global generator, the next step), the loss curve up to its step, and the weights with the
lowest val loss so far (train.keep: best). A run restarted from it draws the same batches and
dropout masks and makes the same updates as the run that never stopped, so on the CPU its final
model is byte-identical to an uninterrupted run's.

It is written whole or not at all (files.atomic_path) and read as tensors and plain values only
(``torch.load(weights_only=True)``): no code runs. ``fingerprint`` names what the checkpoint was
made from, so that a run resumes only a checkpoint of the same params, data and code. Where the
file lives, and what MLflow records of it, is the train stage's business.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.files import atomic_path
from pipeline.lm.models import LanguageModel
from pipeline.lm.training import TrainingState

FORMAT_VERSION = 1


@dataclass
class Best:
    """The eval point with the lowest val loss so far, and a copy of the weights there."""

    step: int = -1
    val_loss: float = float("inf")
    weights: dict[str, torch.Tensor] = field(default_factory=dict)

    def update(self, step: int, val_loss: float, model: LanguageModel) -> None:
        if val_loss < self.val_loss:
            self.step, self.val_loss = step, val_loss
            self.weights = {name: t.detach().clone() for name, t in model.state_dict().items()}


@dataclass
class Checkpoint:
    """What a resumed run starts from, and the MLflow run that wrote it."""

    fingerprint: str
    run_id: str
    model: dict[str, torch.Tensor]
    training: dict[str, Any]
    curve: list[dict]
    best: Best

    @property
    def step(self) -> int:
        return self.training["step"]


def fingerprint(description: dict[str, Any]) -> str:
    """The sha256 of a JSON description of what a run is made from (params, input hashes)."""
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def save_checkpoint(
    path: Path,
    fingerprint: str,
    run_id: str,
    model: LanguageModel,
    state: TrainingState,
    curve: list[dict],
    best: Best,
) -> None:
    contents = {
        "format": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "run_id": run_id,
        "model": model.state_dict(),
        "training": state.state_dict(),
        "curve": curve,
        "best": {"step": best.step, "val_loss": best.val_loss, "weights": best.weights},
    }
    with atomic_path(path) as tmp_path:
        torch.save(contents, tmp_path)


def load_checkpoint(path: Path, fingerprint: str) -> Checkpoint | None:
    """The checkpoint at path when it was made from the same fingerprint, else None.

    Raises ValueError for a file that is no checkpoint of this format, with the reason.
    """
    if not path.is_file():
        return None
    try:
        contents = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:
        raise ValueError(f"it does not load ({str(error).splitlines()[0]})") from None
    if not isinstance(contents, dict) or contents.get("format") != FORMAT_VERSION:
        raise ValueError(f"it is not a checkpoint of format {FORMAT_VERSION}")
    if contents["fingerprint"] != fingerprint:
        return None
    best = contents["best"]
    return Checkpoint(
        fingerprint=contents["fingerprint"],
        run_id=contents["run_id"],
        model=contents["model"],
        training=contents["training"],
        curve=contents["curve"],
        best=Best(best["step"], best["val_loss"], best["weights"]),
    )
