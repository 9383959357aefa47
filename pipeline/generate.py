"""Generate text from a trained model, registered, logged or on disk:

    python -m pipeline.generate --model models:/bigram-shakespeare@champion \
        --prompt "ROMEO:" --chars 300

``--model`` takes a model URI (``models:/NAME@champion``, ``models:/NAME/3``,
``runs:/RUN_ID/model``, ``runs:/RUN_ID/generator``), an MLflow model directory, or a
``model.pt`` written by the train stage (default ``data/train/model.pt``, its vocabulary from
``--vocab``). URIs are looked up in the project's MLflow store: ``mlflow.db`` at the repository
root, or ``$MLFLOW_TRACKING_URI``. MLflow models carry their own vocabulary. The output is the
prompt followed by the generated characters. ``--chars``, ``--temperature`` and ``--seed``
default to the model's sampling defaults, whose ``max_chars`` bounds ``--chars``: the ``sample``
params stored with an MLflow model at training, or params.yaml's for a ``model.pt`` (see
pipeline.textgen). A model fetched from the store goes to a temporary directory that is removed
once the model is in memory, whether loading works or not.

``--help`` and argument errors answer at once: torch and MLflow are imported only to load a
model.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.cli import stage_entry_point
from pipeline.errors import PipelineError
from pipeline.params import PARAMS_FILE, SampleParams, load_params
from pipeline.paths import MODEL_PATH, VOCAB_PATH

if TYPE_CHECKING:
    from pipeline.textgen import TextGenerator

# Where download_artifacts looks up a model: this project's store (and its artifacts).
MODEL_URI_SCHEMES = ("models", "runs", "mlflow-artifacts", "file")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # One line like every other failure, instead of the usage text and exit status 2.
        raise PipelineError(f"{message} (see `{self.prog} --help`)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(
        prog="python -m pipeline.generate",
        description="Continue a prompt with a trained bigram model.",
    )
    parser.add_argument(
        "--model",
        default=str(MODEL_PATH),
        help="models:/NAME@champion, models:/NAME/VERSION, runs:/RUN_ID/model, an MLflow model "
        f"directory or a model.pt (default: {MODEL_PATH})",
    )
    parser.add_argument("--prompt", default="", help="text to continue (default: start a line)")
    from_model = "(default: the model's sampling defaults)"
    parser.add_argument("--chars", type=int, help=f"characters to generate {from_model}")
    parser.add_argument("--temperature", type=float, help=f"sampling temperature {from_model}")
    parser.add_argument("--seed", type=int, help=f"sampling seed {from_model}")
    parser.add_argument(
        "--vocab",
        type=Path,
        default=VOCAB_PATH,
        help=f"vocabulary of a model.pt (default: {VOCAB_PATH}); MLflow models carry their own",
    )
    return parser.parse_args(argv)


def workspace_sample_params(model_path: Path) -> SampleParams:
    """The sampling defaults of a model.pt, which carries none of its own: those of the project
    whose train stage wrote it, params.yaml's sample section (`dvc repro` keeps them in step)."""
    if not PARAMS_FILE.exists():
        raise PipelineError(
            f"{model_path} carries no sampling defaults and there is no {PARAMS_FILE} here: run "
            "this from the repository root, or use the model's MLflow URI (models:/NAME@champion)"
        )
    return load_params().sample


def is_uri(reference: str) -> bool:
    # One-letter schemes are Windows drive letters, i.e. paths.
    return len(urllib.parse.urlparse(reference).scheme) > 1


def load_generator(reference: str, vocab_path: Path) -> TextGenerator:
    from pipeline.data import load_vocab
    from pipeline.model import load_model
    from pipeline.textgen import TextGenerator

    if is_uri(reference):
        return load_from_uri(reference)
    path = Path(reference)
    if (path / "MLmodel").is_file():
        return load_mlflow_model(path)
    if path.is_file():
        chars = load_vocab(vocab_path)
        return TextGenerator(load_model(path, len(chars)), chars, workspace_sample_params(path))
    raise PipelineError(
        f"no model at {reference}: give a model URI (models:/NAME@champion, runs:/RUN_ID/model), "
        f"an MLflow model directory or a model.pt (run `dvc repro train` to make {MODEL_PATH})"
    )


def load_from_uri(uri: str) -> TextGenerator:
    import mlflow
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR
    from mlflow.exceptions import MlflowException

    from pipeline import store

    scheme = urllib.parse.urlparse(uri).scheme
    if scheme not in MODEL_URI_SCHEMES:
        raise PipelineError(
            f"cannot load model {uri}: '{scheme}:' is not a model URI of this project; give "
            "models:/NAME/VERSION, runs:/RUN_ID/model, an MLflow model directory or a model.pt"
        )
    # The generated text is the output; a download progress bar would only clutter it.
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.set(False)
    store_uri = store.use_store()
    if store_uri.startswith("sqlite:"):
        db_path = store.sqlite_path(store_uri)
        if not db_path.exists():
            raise PipelineError(
                f"no MLflow store at {db_path} to look up {uri}: run `dvc repro` first, run "
                f"this from the repository root, or set {store.TRACKING_URI_ENV}"
            )
        store.check_sqlite_store(db_path)
    # The model is read into memory before the directory goes, so no run leaves it behind.
    with tempfile.TemporaryDirectory(prefix="bigram-model-") as download_dir:
        try:
            local_dir = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=download_dir)
        except MlflowException as error:
            raise PipelineError(
                f"cannot load model {uri} from the MLflow store {store.shown_uri(store_uri)}: "
                f"{error.message.splitlines()[0]}"
            ) from None
        except Exception as error:  # Artifact stores fail in their own ways (boto3, HTTP).
            reason = (str(error).strip() or type(error).__name__).splitlines()[0]
            raise PipelineError(
                f"cannot load model {uri} from the MLflow store {store.shown_uri(store_uri)} "
                f"({reason})"
            ) from None
        return load_mlflow_model(Path(local_dir), uri)


def load_mlflow_model(path: Path, source: str | None = None) -> TextGenerator:
    """Load either flavour the train stage logs: the pyfunc generator or the PyTorch model."""
    source = source or str(path)
    try:
        return _load_mlflow_model(path, source)
    except PipelineError:
        raise
    except Exception as error:  # A damaged MLmodel, pickle or weights: whatever its loader raised.
        reason = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise PipelineError(
            f"{source} is not a loadable MLflow model ({reason}); log it again with "
            "`dvc repro --force train`"
        ) from None


def _load_mlflow_model(path: Path, source: str) -> TextGenerator:
    import mlflow.pyfunc
    from mlflow.models import Model

    from pipeline.data import load_vocab
    from pipeline.model import BigramLanguageModel
    from pipeline.serving import BigramTextModel
    from pipeline.textgen import SAMPLING_DEFAULTS_FILE, TextGenerator, read_sampling_defaults

    flavors = Model.load(path / "MLmodel").flavors
    if "pytorch" in flavors:
        import mlflow.pytorch  # Only this flavour needs it.

        model = mlflow.pytorch.load_model(str(path), map_location="cpu")
        extra_files = {
            Path(extra["path"]).name: path / extra["path"]
            for extra in flavors["pytorch"].get("extra_files", [])
        }
        vocab_path = extra_files.get(VOCAB_PATH.name)
        defaults_path = extra_files.get(SAMPLING_DEFAULTS_FILE)
        if isinstance(model, BigramLanguageModel) and vocab_path and defaults_path:
            chars = load_vocab(vocab_path)
            if model.vocab_size == len(chars):
                return TextGenerator(model, chars, read_sampling_defaults(defaults_path))
    elif "python_function" in flavors:
        python_model = mlflow.pyfunc.load_model(str(path)).unwrap_python_model()
        if isinstance(python_model, BigramTextModel):
            return python_model.generator
    raise PipelineError(
        f"{source} is not a bigram model logged by this pipeline's train stage "
        f"(flavours: {', '.join(flavors)})"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    generator = load_generator(args.model, args.vocab)
    request = generator.request(args.prompt, args.chars, args.temperature, args.seed)
    sys.stdout.write(generator.complete(request) + "\n")


if __name__ == "__main__":
    stage_entry_point(main)()
