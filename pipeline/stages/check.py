"""Stage 0, check: validate every param before DVC touches any other stage's outputs.

DVC removes a stage's outputs before it runs the stage's command, so a param that the train stage
rejected would already have cost the workspace its model. This stage comes first in the graph
(download depends on its output) and depends on every params section: after any change to
params.yaml, by hand or by `dvc exp run -S ...`, it runs before every other stage, and a bad value
stops the pipeline here, with every output as it was. Its output is `persist: true`, so DVC
leaves even that in place when the check fails, and it holds the same bytes for any valid params,
so that a valid change reruns only the stages that read the changed param.

The rules that tie a param to the text (data.max_vocab_size, data.train_fraction,
train.block_size, and whether a GPT of the model section's sizes fits in memory) are checked
too when the vocab stage's manifest is of the corpus data.sha256 names: then the vocab stage
will see exactly that text. For a new corpus they are checked by the vocab and train stages on
the data itself. No MLflow run: nothing is computed here.
"""

from __future__ import annotations

from pipeline.cli import stage_entry_point
from pipeline.errors import PipelineError
from pipeline.files import read_json, write_json
from pipeline.lm.sizes import check_model_fits, machine_memory_bytes
from pipeline.params import Params, check_against_corpus, load_params
from pipeline.paths import CORPUS_PATH, MANIFEST_PATH, PARAMS_CHECKED_PATH

# The manifest fields that describe the text the params are checked against.
CORPUS_SHAPE_FIELDS = {
    "corpus_sha256": str,
    "vocab_size": int,
    "train_tokens": int,
    "val_tokens": int,
}


def known_corpus_shape(params: Params) -> tuple[int, int] | None:
    """The vocabulary size and token count of the corpus data.sha256 names, from the vocab
    stage's manifest, or None when the workspace has no manifest of that corpus."""
    if not MANIFEST_PATH.is_file():
        return None
    try:
        manifest = read_json(MANIFEST_PATH, CORPUS_SHAPE_FIELDS)
    except PipelineError:
        return None  # A damaged manifest: the vocab stage rebuilds it and checks the text itself.
    if manifest["corpus_sha256"].lower() != params.data.sha256.lower():
        return None
    return manifest["vocab_size"], manifest["train_tokens"] + manifest["val_tokens"]


def main() -> None:
    params = load_params()
    shape = known_corpus_shape(params)
    if shape is not None:
        vocab_size, num_tokens = shape
        check_against_corpus(params, vocab_size, num_tokens, CORPUS_PATH)
        check_model_fits(params, vocab_size, machine_memory_bytes())
    # The same bytes for any valid params: download, which depends on this file, reruns only for
    # its own params.
    write_json(PARAMS_CHECKED_PATH, {"params": "valid"})
    against = "and against the corpus" if shape is not None else "(the corpus is checked later)"
    print(f"checked {len(params.flat())} params in params.yaml {against}")


if __name__ == "__main__":
    stage_entry_point(main, __doc__)()
