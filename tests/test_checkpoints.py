"""A run resumed from a checkpoint ends with the same bytes as the run that never stopped.

In process, for every step the loops can take: the bigram's closed-form CPU step, the lecture's
step of a GPT with dropout under the cosine schedule (the global generator and the step count
matter there), and L-BFGS on the counts (its history is the state). The pipeline's own kill and
resume, through `dvc repro`, is in test_resume.py.
"""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch
from tqdm import tqdm

from pipeline.lm.bigram import BigramLanguageModel
from pipeline.lm.checkpoints import Best, fingerprint, load_checkpoint, save_checkpoint
from pipeline.lm.counts import bigram_counts
from pipeline.lm.gpt import GPTConfig, GPTLanguageModel
from pipeline.lm.lecture import lecture_train_params
from pipeline.lm.models import LanguageModel
from pipeline.lm.training import fit, new_training_state

VOCAB_SIZE = 65
TOKENS = torch.randint(VOCAB_SIZE, (20_000,), generator=torch.Generator().manual_seed(0)).to(
    torch.uint8
)


class Killed(Exception):
    """Stands for SIGKILL: the loop stops at once, wherever it is."""


def new_bigram() -> LanguageModel:
    return BigramLanguageModel(VOCAB_SIZE)


def new_gpt() -> LanguageModel:
    config = GPTConfig(VOCAB_SIZE, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.2)
    return GPTLanguageModel(config)


CASES = {
    "bigram, closed-form step": (new_bigram, {}),
    "gpt, dropout, cosine": (new_gpt, {"lr_schedule": "cosine", "warmup_iters": 20, "lr": 3e-3}),
    "bigram, L-BFGS on counts": (new_bigram, {"method": "counts"}),
}


def weights_bytes(model: LanguageModel) -> bytes:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


def train(new_model, config, on_eval, resume_from=None) -> LanguageModel:
    """A run as the train stage makes one: seeded, its model and state, maybe a checkpoint's."""
    torch.manual_seed(config.seed + (1 if resume_from else 0))  # A resume must not need it.
    model = new_model()
    state = new_training_state(model, config, torch.device("cpu"))
    if resume_from is not None:
        model.load_state_dict(resume_from.model)
        state.load_state_dict(resume_from.training)
    counts = bigram_counts(TOKENS, VOCAB_SIZE)
    fit(model, TOKENS, counts, config, on_eval, tqdm(disable=True), state)
    return model


@pytest.mark.parametrize("case", CASES)
def test_a_run_resumed_from_a_checkpoint_ends_with_the_same_bytes(case, tmp_path):
    new_model, overrides = CASES[case]
    config = dataclasses.replace(
        lecture_train_params(), max_iters=120, eval_interval=20, batch_size=8, **overrides
    )
    uninterrupted_evals: list[int] = []
    uninterrupted = train(new_model, config, uninterrupted_evals.append)

    path, killed_at = tmp_path / "checkpoint.pt", 60
    evals: list[int] = []
    model_holder: dict = {}

    def checkpoint_then_die(step: int) -> None:
        evals.append(step)
        if step == killed_at:
            state = model_holder["state"]
            save_checkpoint(path, "id", "run", model_holder["model"], state, [], Best())
            raise Killed

    # The killed run: its model and state, which checkpoint_then_die saves at step 60.
    torch.manual_seed(config.seed)
    model = new_model()
    state = new_training_state(model, config, torch.device("cpu"))
    model_holder.update(model=model, state=state)
    counts = bigram_counts(TOKENS, VOCAB_SIZE)
    with pytest.raises(Killed):
        fit(model, TOKENS, counts, config, checkpoint_then_die, tqdm(disable=True), state)

    checkpoint = load_checkpoint(path, "id")
    assert checkpoint is not None and checkpoint.step == killed_at
    resumed = train(new_model, config, evals.append, resume_from=checkpoint)

    assert weights_bytes(resumed) == weights_bytes(uninterrupted)
    assert evals == uninterrupted_evals, "each eval point once, the checkpoint's included"


def test_a_checkpoint_of_other_params_is_not_resumed_and_a_broken_one_is_refused(tmp_path):
    config = lecture_train_params()
    model = new_bigram()
    state = new_training_state(model, config, torch.device("cpu"))
    best = Best()
    best.update(300, 2.5, model)
    path = tmp_path / "checkpoint.pt"
    mine = fingerprint({"train": {"lr": 0.01}})
    save_checkpoint(path, mine, "run", model, state, [{"step": 300}], best)

    assert load_checkpoint(path, fingerprint({"train": {"lr": 0.02}})) is None
    assert load_checkpoint(tmp_path / "absent.pt", mine) is None
    loaded = load_checkpoint(path, mine)
    assert loaded is not None and loaded.best.step == 300 and loaded.curve == [{"step": 300}]
    assert [f.name for f in tmp_path.iterdir()] == ["checkpoint.pt"], "no temporary file left"

    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="does not load"):
        load_checkpoint(path, mine)
    torch.save({"step": 3}, path)
    with pytest.raises(ValueError, match="not a checkpoint of format 1"):
        load_checkpoint(path, mine)
