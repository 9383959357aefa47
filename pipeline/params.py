"""Typed, validated params: params.yaml is read once per stage and checked before any work.

A wrong value fails with the param's dotted name, the allowed range and the value found, so a
typo in ``dvc exp run -S train.lrr=0.1`` or ``-S train.batch_size=3.5`` stops the stage at once
instead of being silently ignored or cast.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.secrets import masked

PARAMS_FILE = Path("params.yaml")
CORPUS_URL_ENV = "BIGRAM_CORPUS_URL"
DEVICES = ("auto", "cpu", "cuda", "mps")
TRAIN_METHODS = ("minibatch", "counts")
MAX_SEED = 2**63  # Every torch and numpy generator takes seeds in [0, 2**63).
# Upper bounds that keep a typo from becoming an allocator traceback or a run of years.
# A batch costs about 60 bytes per token in training: 2**24 tokens take 1 GB.
MAX_BATCH_TOKENS = 1 << 24
MAX_ITERS = 10**9
# Each evaluation is an exact loss over both splits and a point of the logged loss curve.
MAX_EVALS = 100_000
# One generation request: sampling keeps about 40 bytes per character (10 million: 400 MB).
MAX_CHARS_LIMIT = 10_000_000
# Logits divided by a temperature below this can overflow float32 to inf, and the sampling
# probabilities become NaN; at 1e-3 the sampling is already greedy for any trained model.
MIN_TEMPERATURE = 1e-3
# MLflow's rule for registered model names (mlflow.utils.validation._validate_model_name),
# checked here so that a bad name fails before training rather than at registration.
MODEL_NAME_FORBIDDEN = ("/", ":")
# data.name goes into the registered model's name and `models:/<name>/<version>` URIs.
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


@dataclass(frozen=True)
class DataParams:
    url: str
    sha256: str
    # A short name for the corpus: the MLflow dataset's, and the model's (bigram-<name>).
    name: str
    train_fraction: float = 0.9
    # The train and evaluate stages hold several V x V float64 tables: 134 MB each at 4096.
    max_vocab_size: int = 4096

    @property
    def source(self) -> str:
        """Where to fetch the corpus: ``$BIGRAM_CORPUS_URL`` (offline mirror) or ``url``."""
        return os.environ.get(CORPUS_URL_ENV) or self.url


@dataclass(frozen=True)
class TrainParams:
    method: str = "minibatch"
    batch_size: int = 32
    block_size: int = 8
    max_iters: int = 3000
    eval_interval: int = 300
    lr: float = 1e-2
    seed: int = 1337
    device: str = "auto"


@dataclass(frozen=True)
class SampleParams:
    num_chars: int = 500
    seed: int = 1337
    temperature: float = 1.0
    # Upper bound on one generation request, so a typo cannot ask for a billion characters.
    max_chars: int = 1_000_000


@dataclass(frozen=True)
class TrackingParams:
    experiment_name: str = "bigram"
    # Empty: bigram-<data.name>, filled in by load_params.
    registered_model_name: str = ""


@dataclass(frozen=True)
class Params:
    data: DataParams
    train: TrainParams
    sample: SampleParams
    tracking: TrackingParams

    def flat(self) -> dict[str, Any]:
        """Every param as ``section.name: value`` (the names `dvc params diff` shows), for logging:
        a URL's password is masked."""
        return {
            f"{section.name}.{key}": masked(value) if isinstance(value, str) else value
            for section in dataclasses.fields(self)
            for key, value in dataclasses.asdict(getattr(self, section.name)).items()
        }


def load_params(path: Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml; raise PipelineError naming the first bad param."""
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise PipelineError(
            f"{path}: must be a mapping of sections (data, train, sample, tracking)"
        )
    _reject_unknown_keys(raw, [field.name for field in dataclasses.fields(Params)], "", path)
    sections = {}
    for section in dataclasses.fields(Params):
        section_type = _SECTION_TYPES[section.name]
        values = raw.get(section.name) or {}
        if not isinstance(values, dict):
            raise PipelineError(f"{path}: '{section.name}' must be a mapping of params")
        names = [field.name for field in dataclasses.fields(section_type)]
        _reject_unknown_keys(values, names, f"{section.name}.", path)
        sections[section.name] = _build_section(section_type, section.name, values, path)
    params = Params(**sections)
    if not params.tracking.registered_model_name:
        tracking = dataclasses.replace(
            params.tracking, registered_model_name=f"bigram-{params.data.name}"
        )
        params = dataclasses.replace(params, tracking=tracking)
    _validate(params, path)
    return params


def _read_yaml(path: Path) -> Any:
    # ruamel reads YAML 1.2, as DVC does: `lr: 1e-2` is a float, not the string PyYAML makes of it.
    from ruamel.yaml import YAML, YAMLError

    try:
        with open(path, encoding="utf-8") as handle:
            return YAML(typ="safe", pure=True).load(handle)
    except FileNotFoundError:
        raise PipelineError(f"{path} not found: run the stage from the repository root") from None
    except YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).strip().splitlines()[0]
        raise PipelineError(f"{path}: not valid YAML{where}: {problem}") from None


def _reject_unknown_keys(values: dict, known: list[str], prefix: str, path: Path) -> None:
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = (
                f"; did you mean '{prefix}{close[0]}'?" if close else f"; known: {', '.join(known)}"
            )
            raise PipelineError(f"{path}: unknown param '{prefix}{key}'{hint}")


def _build_section(section_type: type, section_name: str, values: dict, path: Path):
    kwargs = {}
    for field in dataclasses.fields(section_type):
        name = f"{section_name}.{field.name}"
        if field.name not in values:
            if field.default is dataclasses.MISSING:
                raise PipelineError(f"{path}: param '{name}' is required")
            continue
        kwargs[field.name] = _coerce(values[field.name], field.type, name, path)
    return section_type(**kwargs)


def _coerce(value: Any, type_name: str, name: str, path: Path) -> Any:
    """Check a YAML value against the field's type without lossy casts (3.5 is no int)."""
    # bool is a subclass of int in Python; `batch_size: true` is still a mistake.
    if type_name == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise PipelineError(f"{path}: param '{name}' must be an integer, got {value!r}")
        return value
    if type_name == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PipelineError(f"{path}: param '{name}' must be a number, got {value!r}")
        return float(value)
    if type_name == "str":
        if not isinstance(value, str):
            raise PipelineError(f"{path}: param '{name}' must be a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported param type {type_name} for {name}")


def _validate(params: Params, path: Path) -> None:
    def require(condition: bool, name: str, rule: str, value: Any) -> None:
        if not condition:
            raise PipelineError(f"{path}: param '{name}' must be {rule}, got {value!r}")

    data, train, sample, tracking = params.data, params.train, params.sample, params.tracking
    require(bool(data.url), "data.url", "a URL", data.url)
    require(
        len(data.sha256) == 64 and all(c in "0123456789abcdef" for c in data.sha256.lower()),
        "data.sha256",
        "a 64-digit hex sha256",
        data.sha256,
    )
    require(
        bool(data.name) and set(data.name) <= NAME_CHARS,
        "data.name",
        "a short name of letters, digits, '.', '_' or '-'",
        data.name,
    )
    require(
        0.0 < data.train_fraction < 1.0, "data.train_fraction", "in (0, 1)", data.train_fraction
    )
    require(data.max_vocab_size >= 2, "data.max_vocab_size", "an integer >= 2", data.max_vocab_size)
    require(train.method in TRAIN_METHODS, "train.method", f"one of {TRAIN_METHODS}", train.method)
    for name in ("batch_size", "block_size", "max_iters", "eval_interval"):
        value = getattr(train, name)
        require(value > 0, f"train.{name}", "a positive integer", value)
    require(
        train.batch_size * train.block_size <= MAX_BATCH_TOKENS,
        "train.batch_size",
        f"at most {MAX_BATCH_TOKENS:,} tokens per batch with train.block_size = "
        f"{train.block_size} (batch_size x block_size), to fit in memory",
        train.batch_size,
    )
    require(
        train.max_iters <= MAX_ITERS, "train.max_iters", f"at most {MAX_ITERS:,}", train.max_iters
    )
    require(
        train.max_iters <= train.eval_interval * MAX_EVALS,
        "train.eval_interval",
        f"at least train.max_iters / {MAX_EVALS:,} (at most {MAX_EVALS:,} evaluations)",
        train.eval_interval,
    )
    # YAML reads .nan and .inf as floats; neither is a usable learning rate or temperature.
    require(math.isfinite(train.lr) and train.lr > 0, "train.lr", "a finite number > 0", train.lr)
    require(train.device in DEVICES, "train.device", f"one of {DEVICES}", train.device)
    for name, seed in (("train.seed", train.seed), ("sample.seed", sample.seed)):
        require(0 <= seed < MAX_SEED, name, "an integer in [0, 2**63)", seed)
    require(sample.num_chars > 0, "sample.num_chars", "a positive integer", sample.num_chars)
    require(sample.max_chars > 0, "sample.max_chars", "a positive integer", sample.max_chars)
    require(
        sample.max_chars <= MAX_CHARS_LIMIT,
        "sample.max_chars",
        f"at most {MAX_CHARS_LIMIT:,} (to fit in memory)",
        sample.max_chars,
    )
    require(
        sample.num_chars <= sample.max_chars,
        "sample.num_chars",
        f"at most sample.max_chars = {sample.max_chars}",
        sample.num_chars,
    )
    require(
        math.isfinite(sample.temperature) and sample.temperature > 0,
        "sample.temperature",
        "a finite number > 0",
        sample.temperature,
    )
    require(
        sample.temperature >= MIN_TEMPERATURE,
        "sample.temperature",
        f"at least {MIN_TEMPERATURE} (lower overflows the probabilities)",
        sample.temperature,
    )
    require(bool(tracking.experiment_name), "tracking.experiment_name", "non-empty", "")
    name = tracking.registered_model_name
    require(
        bool(name.strip())
        and not any(char in name for char in MODEL_NAME_FORBIDDEN)
        and posixpath.normpath(name) == name
        and name != "."
        and not name.startswith(".."),
        "tracking.registered_model_name",
        "a name MLflow's Model Registry accepts: non-empty, no '/' or ':', not '.' or '..'",
        name,
    )


_SECTION_TYPES = {
    "data": DataParams,
    "train": TrainParams,
    "sample": SampleParams,
    "tracking": TrackingParams,
}
