"""Both model families behind one door: build one from params, save it, load it, say its context.

A bigram's model.pt is its state dict alone (the bytes of every earlier run). A GPT's holds its
architecture beside its weights, ``{"architecture": {...}, "state_dict": {...}}``, plain values
that torch's tensors-only loader reads, so every reader (evaluate, register, sample, the served
model, the generate command) rebuilds the right model from the file alone, trusting no code.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import torch

from pipeline.errors import PipelineError
from pipeline.files import write_bytes
from pipeline.lm import bigram
from pipeline.lm.bigram import BigramLanguageModel, load_tensors
from pipeline.lm.gpt import GPTLanguageModel
from pipeline.lm.sizes import GPTConfig, gpt_config
from pipeline.params import Params

LanguageModel = BigramLanguageModel | GPTLanguageModel
ARCHITECTURE = "architecture"
STATE_DICT = "state_dict"


def new_model(params: Params, vocab_size: int) -> LanguageModel:
    """A freshly initialised model of params' model.type (draws from torch's global generator)."""
    if params.model.type == "gpt":
        return GPTLanguageModel(gpt_config(params, vocab_size))
    return BigramLanguageModel(vocab_size)


def context_length(model: LanguageModel) -> int:
    """How many of the last characters the next one depends on."""
    return model.config.block_size if isinstance(model, GPTLanguageModel) else 1


def describe(model: LanguageModel) -> dict[str, int | float | str]:
    """The architecture as plain values: {"type": "gpt", "n_layer": 3, ...} or {"type": "bigram",
    "vocab_size": 65}; logged with the model so that its page says what it is."""
    if isinstance(model, GPTLanguageModel):
        return {"type": "gpt", **dataclasses.asdict(model.config)}
    return {"type": "bigram", "vocab_size": model.vocab_size}


def save_model(model: LanguageModel, path: Path) -> None:
    """Save the weights so that the same weights always give the same bytes (see
    bigram.save_model); a GPT's with its architecture."""
    if isinstance(model, BigramLanguageModel):
        bigram.save_model(model, path)
        return
    buffer = io.BytesIO()
    torch.save(
        {ARCHITECTURE: dataclasses.asdict(model.config), STATE_DICT: model.state_dict()}, buffer
    )
    write_bytes(path, buffer.getvalue())


def load_model(path: Path, vocab_size: int) -> LanguageModel:
    """The model a train stage saved, of either family, checked against this vocabulary.

    The file is read as tensors and plain values only (bigram.load_tensors): no code runs.
    """
    state = load_tensors(path)
    if isinstance(state, dict) and ARCHITECTURE in state:
        return _gpt_from_state(path, state, vocab_size)
    weights = state.get("token_embedding_table.weight") if isinstance(state, dict) else None
    return bigram.model_from_weights(path, weights, vocab_size)


def _gpt_from_state(path: Path, state: dict, vocab_size: int) -> GPTLanguageModel:
    architecture, weights = state.get(ARCHITECTURE), state.get(STATE_DICT)
    fields = {field.name: field.type for field in dataclasses.fields(GPTConfig)}
    if (
        not isinstance(architecture, dict)
        or set(architecture) != set(fields)
        or not isinstance(weights, dict)
    ):
        raise PipelineError(
            f"{path} is not a GPT saved by the train stage: rerun `dvc repro train`"
        )
    try:
        config = GPTConfig(**architecture)
        if config.vocab_size != vocab_size:
            raise PipelineError(
                f"{path} is a GPT of a vocabulary of {config.vocab_size} characters but the "
                f"vocabulary has {vocab_size}: the model was trained on another vocabulary; "
                "rerun `dvc repro`"
            )
        model = GPTLanguageModel(config)
        model.load_state_dict(weights)
    except (TypeError, ValueError, RuntimeError) as error:
        reason = str(error).strip().splitlines()[0]
        raise PipelineError(
            f"{path} does not hold the GPT its architecture names ({reason}); rerun "
            "`dvc repro train`"
        ) from None
    return model
