"""Generate text from a trained model, registered, logged or on disk:

    python -m pipeline.generate --model models:/bigram-shakespeare@champion \
        --prompt "ROMEO:" --chars 300

``--model`` takes a model URI (``models:/NAME@champion``, ``models:/NAME/3``,
``runs:/RUN_ID/model``, ``runs:/RUN_ID/generator``), an MLflow model directory, or a
``model.pt`` written by the train stage (default ``data/train/model.pt``, its vocabulary from
``--vocab``). URIs are looked up in the project's MLflow store: ``mlflow.db`` at the repository
root, or ``$MLFLOW_TRACKING_URI``. MLflow models carry their own vocabulary. The output is the
prompt followed by the generated characters. ``--chars``, ``--temperature`` and ``--seed``
default to params.yaml's ``sample`` section, whose ``max_chars`` bounds ``--chars``. A model
fetched from the store goes to a temporary directory that is removed once the model is in
memory, whether loading works or not.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import urllib.parse
from pathlib import Path

from pipeline import tracking
from pipeline.data import load_vocab
from pipeline.errors import PipelineError, stage_entry_point
from pipeline.model import BigramLanguageModel, load_model
from pipeline.params import PARAMS_FILE, SampleParams, load_params
from pipeline.paths import MODEL_PATH, VOCAB_PATH
from pipeline.textgen import TextGenerator, checked_request

# Where download_artifacts looks up a model: this project's store (and its artifacts).
MODEL_URI_SCHEMES = ("models", "runs", "mlflow-artifacts", "file")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # One line like every other failure, instead of the usage text and exit status 2.
        raise PipelineError(f"{message} (see `{self.prog} --help`)")


def parse_args(argv: list[str] | None, defaults: SampleParams) -> argparse.Namespace:
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
    parser.add_argument(
        "--chars", type=int, default=defaults.num_chars, help="characters to generate"
    )
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--vocab",
        type=Path,
        default=VOCAB_PATH,
        help=f"vocabulary of a model.pt (default: {VOCAB_PATH}); MLflow models carry their own",
    )
    return parser.parse_args(argv)


def sample_params() -> SampleParams:
    """params.yaml's sample section when run in the project, else the defaults."""
    return load_params().sample if PARAMS_FILE.exists() else SampleParams()


def is_uri(reference: str) -> bool:
    # One-letter schemes are Windows drive letters, i.e. paths.
    return len(urllib.parse.urlparse(reference).scheme) > 1


def load_generator(reference: str, vocab_path: Path) -> TextGenerator:
    if is_uri(reference):
        return load_from_uri(reference)
    path = Path(reference)
    if (path / "MLmodel").is_file():
        return load_mlflow_model(path)
    if path.is_file():
        chars = load_vocab(vocab_path)
        return TextGenerator(load_model(path, len(chars)), chars)
    raise PipelineError(
        f"no model at {reference}: give a model URI (models:/NAME@champion, runs:/RUN_ID/model), "
        f"an MLflow model directory or a model.pt (run `dvc repro train` to make {MODEL_PATH})"
    )


def load_from_uri(uri: str) -> TextGenerator:
    import mlflow
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR
    from mlflow.exceptions import MlflowException

    scheme = urllib.parse.urlparse(uri).scheme
    if scheme not in MODEL_URI_SCHEMES:
        raise PipelineError(
            f"cannot load model {uri}: '{scheme}:' is not a model URI of this project; give "
            "models:/NAME/VERSION, runs:/RUN_ID/model, an MLflow model directory or a model.pt"
        )
    # The generated text is the output; a download progress bar would only clutter it.
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.set(False)
    store = tracking.use_store()
    if store.startswith("sqlite:"):
        db_path = tracking.sqlite_path(store)
        if not db_path.exists():
            raise PipelineError(
                f"no MLflow store at {db_path} to look up {uri}: run `dvc repro` first, run "
                f"this from the repository root, or set {tracking.TRACKING_URI_ENV}"
            )
        tracking.check_sqlite_store(db_path)
    # The model is read into memory before the directory goes, so no run leaves it behind.
    with tempfile.TemporaryDirectory(prefix="bigram-model-") as download_dir:
        try:
            local_dir = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=download_dir)
        except MlflowException as error:
            raise PipelineError(
                f"cannot load model {uri} from the MLflow store {tracking.shown_uri(store)}: "
                f"{error.message.splitlines()[0]}"
            ) from None
        except Exception as error:  # Artifact stores fail in their own ways (boto3, HTTP).
            reason = (str(error).strip() or type(error).__name__).splitlines()[0]
            raise PipelineError(
                f"cannot load model {uri} from the MLflow store {tracking.shown_uri(store)} "
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
    import mlflow.pytorch
    from mlflow.models import Model

    from pipeline.serving import BigramTextModel

    flavors = Model.load(path / "MLmodel").flavors
    if "pytorch" in flavors:
        model = mlflow.pytorch.load_model(str(path), map_location="cpu")
        vocab_files = [path / extra["path"] for extra in flavors["pytorch"].get("extra_files", [])]
        vocab_path = next((p for p in vocab_files if p.name == VOCAB_PATH.name), None)
        if isinstance(model, BigramLanguageModel) and vocab_path is not None:
            chars = load_vocab(vocab_path)
            if model.vocab_size == len(chars):
                return TextGenerator(model, chars)
    elif "python_function" in flavors:
        python_model = mlflow.pyfunc.load_model(str(path)).unwrap_python_model()
        if isinstance(python_model, BigramTextModel):
            return python_model.generator
    raise PipelineError(
        f"{source} is not a bigram model logged by this pipeline's train stage "
        f"(flavours: {', '.join(flavors)})"
    )


def main(argv: list[str] | None = None) -> None:
    defaults = sample_params()
    args = parse_args(argv, defaults)
    request = checked_request(
        args.prompt, args.chars, args.temperature, args.seed, defaults.max_chars
    )
    generator = load_generator(args.model, args.vocab)
    text = generator.generate(request.prompt, request.num_chars, request.temperature, request.seed)
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    stage_entry_point(main)()
