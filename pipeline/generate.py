"""Generate text from a trained model, registered, logged or on disk:

    python -m pipeline.generate --model models:/bigram-shakespeare@champion \
        --prompt "ROMEO:" --chars 300

``--model`` takes a model URI (``models:/NAME@champion``, ``models:/NAME/3``,
``runs:/RUN_ID/model``, ``runs:/RUN_ID/generator``), an MLflow model directory, or a
``model.pt`` written by the train stage (default ``data/train/model.pt``, its vocabulary from
``--vocab``). URIs are looked up in the project's MLflow store: ``mlflow.db`` at the repository
root, or ``$MLFLOW_TRACKING_URI``. MLflow models carry their own vocabulary. The output is the
prompt followed by the generated characters. ``--chars``, ``--temperature``, ``--seed`` and
``--top-k`` default to the model's sampling defaults, whose ``max_chars`` bounds ``--chars``:
the ``sample`` params stored with an MLflow model at registration, or params.yaml's for a
``model.pt`` (see pipeline.lm.sampling). A model fetched from the store goes to a temporary
directory that is removed once the model is in memory, whether loading works or not; a
``file:`` URI is read in place.

A model source is data, never code: from any form of a model only tensors (through torch's
tensors-only unpickler) and JSON files are read, each inside the model's directory; no pickle
of the model's is run and none of its code imported (docs/DESIGN.md, "What a model source is
trusted for"). When the reader of the output stops early (``| head -c 10``), the command ends
quietly with status 141, as a closed pipe ends any Unix tool.

``--help`` and argument errors answer at once: torch and MLflow are imported only to load a
model.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.cli import stage_entry_point
from pipeline.errors import PipelineError
from pipeline.params import PARAMS_FILE, SampleParams, load_params
from pipeline.paths import MODEL_PATH, VOCAB_PATH
from pipeline.secrets import masked

if TYPE_CHECKING:
    from pipeline.lm.sampling import TextGenerator

# Where download_artifacts looks up a model: this project's store (and its artifacts).
MODEL_URI_SCHEMES = ("models", "runs", "mlflow-artifacts", "file")
# How long a failed download's directory is removed again while MLflow's threads finish.
REMOVAL_ATTEMPTS = 50
REMOVAL_PAUSE_S = 0.1
# What a shell reports for a command that a closed pipe stopped (128 + SIGPIPE), as `yes | head`.
EXIT_BROKEN_PIPE = 141


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # One line like every other failure, instead of the usage text and exit status 2.
        raise PipelineError(f"{message} (see `{self.prog} --help`)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(
        prog="python -m pipeline.generate",
        description="Continue a prompt with a trained bigram or GPT model.",
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
        "--top-k",
        type=int,
        help=f"draw from the k most likely characters only, 0: off {from_model}",
    )
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
    if not is_uri(reference):
        return load_from_path(Path(reference), vocab_path, reference)
    parsed = urllib.parse.urlparse(reference)
    if parsed.scheme == "file":
        from urllib.request import url2pathname

        # Read in place: copying whatever a file: URI names (/proc/self/) first could take
        # without end and would only duplicate a local model.
        path = Path(url2pathname(parsed.path))
        return load_from_path(path, vocab_path, reference)
    return load_from_uri(reference)


def load_from_path(path: Path, vocab_path: Path, reference: str) -> TextGenerator:
    from pipeline.lm.models import load_model
    from pipeline.lm.sampling import TextGenerator
    from pipeline.lm.tokens import load_vocab

    if path.is_dir() and (path / "MLmodel").exists():
        return load_mlflow_model(path, reference)
    if path.is_file():
        chars = load_vocab(vocab_path)
        return TextGenerator(load_model(path, len(chars)), chars, workspace_sample_params(path))
    raise PipelineError(
        f"no model at {reference}: give a model URI (models:/NAME@champion, runs:/RUN_ID/model), "
        f"an MLflow model directory or a model.pt (run `dvc repro train` to make {MODEL_PATH})"
    )


@contextlib.contextmanager
def download_directory() -> Iterator[Path]:
    """A temporary directory for a model fetched from the store, removed on every way out.

    MLflow copies files on worker threads, which go on writing after the download has failed;
    the directory is removed again until they have finished, so that none is left behind.
    """
    directory = Path(tempfile.mkdtemp(prefix="bigram-model-"))
    try:
        yield directory
    finally:
        for _ in range(REMOVAL_ATTEMPTS):
            shutil.rmtree(directory, ignore_errors=True)
            if not directory.exists():
                break
            time.sleep(REMOVAL_PAUSE_S)


def load_from_uri(uri: str) -> TextGenerator:
    import mlflow
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import store

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
    with download_directory() as download_dir:
        try:
            local_dir = mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(download_dir)
            )
        except MlflowException as error:
            raise PipelineError(
                f"cannot load model {uri} from the MLflow store {masked(store_uri)}: "
                f"{error.message.splitlines()[0]}"
            ) from None
        except Exception as error:  # Artifact stores fail in their own ways (boto3, HTTP).
            reason = (str(error).strip() or type(error).__name__).splitlines()[0]
            raise PipelineError(
                f"cannot load model {uri} from the MLflow store {masked(store_uri)} ({reason})"
            ) from None
        return load_mlflow_model(Path(local_dir), uri)


def load_mlflow_model(path: Path, source: str | None = None) -> TextGenerator:
    """Load either flavour the register stage logs, the pyfunc generator or the PyTorch model, from
    its tensors and JSON files alone: no pickle is run, no code of the model's is imported (see
    docs/DESIGN.md, "What a model source is trusted for")."""
    source = source or str(path)
    try:
        return _load_mlflow_model(path.resolve(), source)
    except PipelineError:
        raise
    except Exception as error:  # A damaged MLmodel: whatever its parser raised.
        reason = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise PipelineError(
            f"{source} is not a loadable MLflow model ({reason}); log it again with "
            "`dvc repro --force train`"
        ) from None


def _load_mlflow_model(root: Path, source: str) -> TextGenerator:
    import yaml

    from pipeline.lm.bigram import load_logged_module
    from pipeline.lm.models import LanguageModel, load_model
    from pipeline.lm.sampling import SAMPLING_DEFAULTS_FILE, TextGenerator, read_sampling_defaults
    from pipeline.lm.tokens import load_vocab

    mlmodel = yaml.safe_load(model_file(root, "MLmodel", source).read_text(encoding="utf-8"))
    flavors = mlmodel.get("flavors") if isinstance(mlmodel, dict) else None
    if not isinstance(flavors, dict):
        raise PipelineError(
            f"{source} is not a loadable MLflow model (its MLmodel names no flavours)"
        )
    pytorch = flavors.get("pytorch")
    generator = flavors.get("python_function")
    if isinstance(pytorch, dict):
        # The vocabulary and the defaults are the flavour's extra files, named by file name.
        extra = {
            Path(entry["path"]).name: entry["path"]
            for entry in pytorch.get("extra_files") or []
            if isinstance(entry, dict) and isinstance(entry.get("path"), str)
        }
        files = {
            "weights": f"{pytorch.get('model_data', 'data')}/model.pth",
            "vocab": extra.get(VOCAB_PATH.name),
            "defaults": extra.get(SAMPLING_DEFAULTS_FILE),
        }
        load_weights: Callable[[Path, int], LanguageModel] = load_logged_module
        if MODEL_PATH.name in extra:  # A GPT's: its model.pt, tensors only, beside the pickle.
            files["weights"], load_weights = extra[MODEL_PATH.name], load_model
    elif isinstance(generator, dict) and isinstance(generator.get("artifacts"), dict):
        artifacts = generator["artifacts"]
        files = {
            name: entry.get("path") if isinstance(entry, dict) else None
            for name in ("weights", "vocab", "defaults")
            for entry in [artifacts.get(name)]
        }
        load_weights = load_model
    else:
        raise PipelineError(
            f"{source} is not a bigram model logged by this pipeline's train stage "
            f"(flavours: {', '.join(map(str, flavors))})"
        )
    # Every file is checked before any is read.
    paths = {name: model_file(root, relative, source) for name, relative in files.items()}
    chars = load_vocab(paths["vocab"])
    model = load_weights(paths["weights"], len(chars))
    return TextGenerator(model, chars, read_sampling_defaults(paths["defaults"]))


def model_file(root: Path, relative: object, source: str) -> Path:
    """The file of a model directory that its MLmodel names: a regular file inside the
    directory, symbolic links followed, so that a crafted MLmodel (``../../etc/passwd``, an
    absolute path, a link out) cannot make the command read anything else."""
    if not isinstance(relative, str) or not relative:
        raise PipelineError(
            f"{source} is not a bigram model logged by this pipeline's train stage (its "
            "MLmodel names no weights, vocabulary or sampling defaults)"
        )
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise PipelineError(
            f"{source} is refused: its MLmodel names {relative!r}, outside the model's "
            "directory; load only models this pipeline logged"
        )
    if not path.is_file():
        raise PipelineError(
            f"{source} lacks {relative} (or it is not a regular file); log it again with "
            "`dvc repro --force train`"
        )
    return path


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    generator = load_generator(args.model, args.vocab)
    request = generator.request(args.prompt, args.chars, args.temperature, args.seed, args.top_k)
    write_output(generator.complete(request) + "\n")


def write_output(text: str) -> None:
    """Print the text; a reader that stops early (`| head -c 10`) ends the command quietly with
    status 141, as a closed pipe ends any Unix tool, instead of a BrokenPipeError traceback."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # Python's advice: point stdout at /dev/null, so the flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_BROKEN_PIPE)


if __name__ == "__main__":
    stage_entry_point(main)()
