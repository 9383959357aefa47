"""Your own text: any UTF-8 corpus, named by data.name, its vocabulary bounded.

The end-to-end test runs the real `dvc repro` on a Chinese-looking corpus of 300 characters
(3 bytes each in UTF-8) drawn from a known Markov chain, fetched from data.url as a user's own
text would be, and checks the losses against the chain's entropy rate, the names in MLflow and
that no stage prints a warning (matplotlib warned once per CJK tick label before).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from pipeline.lm.heatmap import MAX_LABELLED
from testbed import (
    assert_one_line_error,
    commit_all,
    files_in,
    make_repo_copy,
    mlflow_runs,
    pipeline_env,
    run,
    run_stage,
    update_params,
)
from tests.support.markov import entropy_rate, sample_chain

V = 300
SUCCESSORS = 4  # per character: a sparse chain is learnt well from a small corpus
NUM_TOKENS = 150_000
# States 0..296 are CJK ideographs, then the full-width comma and full stop, and a newline.
ALPHABET = [chr(0x4E00 + i) for i in range(V - 3)] + ["，", "。", "\n"]
CORPUS_NAME = "markov-cjk"


def sparse_chain(rng: np.random.Generator) -> np.ndarray:
    """Each state goes to the next one (so the chain is irreducible) or to 3 random others,
    every allowed move with probability >= 1/8, so the train split shows them all."""
    transitions = np.zeros((V, V))
    for state in range(V):
        following = (state + 1) % V
        others = rng.choice(np.delete(np.arange(V), following), SUCCESSORS - 1, replace=False)
        weights = 0.5 * rng.dirichlet(np.ones(SUCCESSORS)) + 0.5 / SUCCESSORS
        transitions[state, [following, *others]] = weights
    return transitions


@pytest.fixture(scope="module")
def cjk_corpus(tmp_path_factory) -> tuple[Path, float]:
    """The corpus file and the exact entropy rate of the chain that drew it."""
    rng = np.random.default_rng(2024)
    transitions = sparse_chain(rng)
    text = "".join(ALPHABET[token] for token in sample_chain(transitions, NUM_TOKENS, rng))
    path = tmp_path_factory.mktemp("own-text") / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path, entropy_rate(transitions)


@pytest.mark.e2e
def test_the_pipeline_on_a_cjk_corpus_reaches_the_entropy_rate_with_no_warning(
    cjk_corpus, tmp_path
):
    corpus, entropy = cjk_corpus
    # No mirror: the download stage fetches data.url, here a local file, as the README shows.
    env = pipeline_env(None)
    repo = make_repo_copy(tmp_path / "repo", env)
    sha256 = hashlib.sha256(corpus.read_bytes()).hexdigest()
    update_params(
        repo,
        data={"url": corpus.as_uri(), "sha256": sha256, "name": CORPUS_NAME},
        # Full-batch L-BFGS fits all 90,000 logits to the counts in a few hundred iterations.
        train={"method": "counts", "max_iters": 300, "eval_interval": 100},
        sample={"num_chars": 200},
    )
    commit_all(repo, env, "own text")

    result = run(["dvc", "repro"], repo, env)

    output = result.stdout + result.stderr
    assert "Running stage 'evaluate'" in result.stdout
    warnings = [line for line in output.splitlines() if "warn" in line.lower()]
    assert warnings == []
    manifest = json.loads((repo / "data/vocab/manifest.json").read_text())
    assert manifest["vocab_size"] == V and manifest["dtype"] == "uint16"
    assert json.loads((repo / "data/vocab/vocab.json").read_text())["chars"] == sorted(ALPHABET)

    # 135,000 train tokens estimate 1,200 transitions: the sample's optimum lies about
    # 1,200 / (2 x 135,000) = 0.004 nats below the entropy rate (1.3153), the val loss as far
    # above it, give or take 0.005 for 15,000 val tokens. Seen: 1.3124 and 1.3175.
    metrics = json.loads((repo / "data/evaluate/metrics.json").read_text())
    assert metrics["uniform_loss"] == pytest.approx(math.log(V), abs=1e-9)
    assert metrics["train_bigram_optimum"] == pytest.approx(entropy, abs=0.01)
    assert 0 <= metrics["train_gap_to_optimum"] < 1e-4
    assert metrics["val_loss"] == pytest.approx(entropy, abs=0.015)

    # 300 characters are too many to label: the picture shows the most frequent and says so.
    with Image.open(repo / "data/evaluate/next_char_probs.png") as image:
        assert image.text["Title"] == (
            f"P(next | current) for the {MAX_LABELLED} most frequent of {V} characters"
        )
    sample = (repo / "data/sample/sample.txt").read_text(encoding="utf-8")
    assert len(sample) == 200 and set(sample) <= set(ALPHABET)

    # The corpus's name, not Tiny Shakespeare's, in the dataset and the registered model.
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    assert [m.name for m in client.search_registered_models()] == [f"bigram-{CORPUS_NAME}"]
    runs = mlflow_runs(repo)
    training = next(r for r in runs if r.data.tags["stage"] == "train")
    datasets = {found.dataset.name: found.dataset for found in training.inputs.dataset_inputs}
    assert set(datasets) == {CORPUS_NAME, f"{CORPUS_NAME}-train", f"{CORPUS_NAME}-val"}
    assert datasets[CORPUS_NAME].digest == sha256[:16]
    download = next(r for r in runs if r.data.tags["stage"] == "download")
    assert download.data.tags["corpus_source"] == corpus.as_uri()


def test_a_vocabulary_above_data_max_vocab_size_stops_the_vocab_stage(prepared_copy):
    repo, env = prepared_copy
    update_params(repo, data={"max_vocab_size": 64})

    result = run_stage("vocab", repo, env)

    assert_one_line_error(
        result,
        "the corpus has 65 distinct characters, above data.max_vocab_size = 64; "
        "raise it in params.yaml",
    )
    assert files_in(repo / "data/vocab") == [], "no token files from a refused vocabulary"
    update_params(repo, data={"max_vocab_size": 65})
    assert run_stage("vocab", repo, env).returncode == 0
    assert json.loads((repo / "data/vocab/manifest.json").read_text())["vocab_size"] == 65
