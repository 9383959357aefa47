"""Typed, validated params: params.yaml is read once per stage and checked before any work.

params.yaml holds every param and its value; it is the one place where they are set (DVC reads
it too: `dvc params diff`, `dvc exp run -S train.lr=3e-3`). Here each section is a dataclass:
a field's annotation is the type its YAML value must have (no lossy casts: 3.5 is no int), its
``param(...)`` lists beside it the rules its value must pass, and ``joint_checks`` ties fields
together. A wrong value fails with the param's dotted name, the rule and the value found, so a
typo in ``-S train.lrr=0.1`` or ``-S train.batch_size=3.5`` stops the stage at once instead of
being ignored or cast.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import posixpath
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.secrets import masked

PARAMS_FILE = Path("params.yaml")
# A mirror of data.url for this machine (offline machines, CI); read by the download stage only.
# Not a param: the corpus it gives is the same, checked against data.sha256.
CORPUS_URL_ENV = "BIGRAM_CORPUS_URL"
DEVICES = ("auto", "cpu", "cuda", "mps")
TRAIN_METHODS = ("minibatch", "counts")
MODEL_TYPES = ("bigram", "gpt")
LR_SCHEDULES = ("constant", "cosine")
KEEP = ("last", "best")
MAX_SEED = 2**63  # Every torch and numpy generator takes seeds in [0, 2**63).
# Upper bounds that keep a typo from becoming an allocator traceback or a run of years.
# A batch costs about 60 bytes per token in training: 2**24 tokens take 1 GB.
MAX_BATCH_TOKENS = 1 << 24
MAX_ITERS = 10**9
# Each evaluation is an exact loss over both splits and a point of the logged loss curve.
MAX_EVALS = 100_000
# torchrun processes on one machine: a typo of 1000 would fork a thousand trainings.
MAX_PROCESSES = 64
# One generation request: sampling keeps about 40 bytes per character (10 million: 400 MB).
MAX_CHARS_LIMIT = 10_000_000
# Logits divided by a temperature below this can overflow float32 to inf, and the sampling
# probabilities become NaN; at 1e-3 the sampling is already greedy for any trained model.
MIN_TEMPERATURE = 1e-3
# data.name goes into the registered model's name and `models:/<name>/<version>` URIs.
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
# MLflow's SQL stores keep experiment and registered model names in VARCHAR(256) columns:
# PostgreSQL refuses a longer one, but only when the run or the registration writes it.
MAX_STORE_NAME = 256
# The registered model is <model.type>-<data.name> unless tracking names it: the longest prefix.
REGISTERED_NAME_PREFIX = "bigram-"


Rule = tuple[str, Callable[[Any], bool]]


def param(*rules: Rule, default: Any = dataclasses.MISSING) -> Any:
    """A field whose value must pass each (rule, check) in turn; the first rule it fails is
    the error's "must be ..." . params.yaml must give every field; a default is only for code
    that builds a section itself (the lecture's reference)."""
    return dataclasses.field(metadata={"rules": rules}, default=default)


POSITIVE: Rule = ("a positive integer", lambda value: value > 0)
# YAML reads .nan and .inf as floats; neither is a usable learning rate or temperature.
FINITE_POSITIVE: Rule = ("a finite number > 0", lambda value: math.isfinite(value) and value > 0)
SEED: Rule = ("an integer in [0, 2**63)", lambda value: 0 <= value < MAX_SEED)
STORE_NAME: Rule = (
    f"at most {MAX_STORE_NAME} characters (MLflow's stores hold no longer name)",
    lambda value: len(value) <= MAX_STORE_NAME,
)


def sha256_hex(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value.lower())


def short_name(value: str) -> bool:
    return bool(value) and set(value) <= NAME_CHARS


def registry_name(value: str) -> bool:
    """MLflow's rule for registered model names (mlflow.utils.validation._validate_model_name),
    checked here so that a bad name fails before training rather than at registration."""
    return (
        bool(value.strip())
        and not any(char in value for char in ("/", ":"))
        and posixpath.normpath(value) == value
        and value != "."
        and not value.startswith("..")
    )


# A section's joint_checks() yields, for each check that ties fields together,
# (passed, field, rule, value).
Check = tuple[bool, str, str, Any]


@dataclass(frozen=True)
class DataParams:
    url: str = param(("a URL", bool))
    sha256: str = param(("a 64-digit hex sha256", sha256_hex))
    # Names the MLflow dataset and the registered model (bigram-<name>).
    name: str = param(
        ("a short name of letters, digits, '.', '_' or '-'", short_name),
        (
            f"at most {MAX_STORE_NAME - len(REGISTERED_NAME_PREFIX)} characters (the registered "
            f"model's name, {REGISTERED_NAME_PREFIX}<name>, must fit MLflow's store)",
            lambda value: len(REGISTERED_NAME_PREFIX) + len(value) <= MAX_STORE_NAME,
        ),
    )
    train_fraction: float = param(("in (0, 1)", lambda value: 0.0 < value < 1.0))
    # The train and evaluate stages hold several V x V float64 tables: 134 MB each at 4096.
    max_vocab_size: int = param(("an integer >= 2", lambda value: value >= 2))


@dataclass(frozen=True)
class TrainParams:
    method: str = param((f"one of {TRAIN_METHODS}", lambda value: value in TRAIN_METHODS))
    batch_size: int = param(POSITIVE)
    block_size: int = param(POSITIVE)
    max_iters: int = param(POSITIVE, (f"at most {MAX_ITERS:,}", lambda value: value <= MAX_ITERS))
    eval_interval: int = param(POSITIVE)
    lr: float = param(FINITE_POSITIVE)
    seed: int = param(SEED)
    device: str = param((f"one of {DEVICES}", lambda value: value in DEVICES))
    # constant: train.lr at every step (the lecture's). cosine: a linear warm-up over
    # train.warmup_iters steps, then half a cosine down to train.lr / 10 at the last step
    # (nanoGPT's schedule).
    lr_schedule: str = param(
        (f"one of {LR_SCHEDULES}", lambda value: value in LR_SCHEDULES), default="constant"
    )
    warmup_iters: int = param(("an integer >= 0", lambda value: value >= 0), default=0)
    # A GPT's loss curve: the mean loss of this many random batches per split at each eval point
    # (the lecture's estimate_loss). A bigram's curve is exact, from its counts.
    eval_iters: int = param(POSITIVE, default=200)
    # torch's CPU threads while training. Float sums depend on the count, so it is a param: the
    # same count gives the same bytes. A GPT's matmuls run about 1.5x faster on 2 threads than on
    # 1 (baby GPT, 2 cores: benchmarks/gpt.py); a bigram gains nothing.
    threads: int = param(POSITIVE, default=1)
    # A checkpoint (model, optimizer, RNG states, curve) at every this many eval points, from
    # which a killed train stage resumes exactly; each is a logged model of the run. 0: none.
    checkpoint_every: int = param(("an integer >= 0", lambda value: value >= 0), default=1)
    # What the stage outputs: the model of the last step, or of the eval point with the lowest
    # val loss (a GPT's: the estimate).
    keep: str = param((f"one of {KEEP}", lambda value: value in KEEP), default="last")
    # Processes that train together (torchrun, DistributedDataParallel), each on batches of its
    # own: a step sees batch_size x processes sequences (pipeline.lm.distributed).
    processes: int = param(
        POSITIVE, (f"at most {MAX_PROCESSES}", lambda value: value <= MAX_PROCESSES), default=1
    )

    def joint_checks(self) -> Iterator[Check]:
        yield (
            self.batch_size * self.block_size <= MAX_BATCH_TOKENS,
            "batch_size",
            f"at most {MAX_BATCH_TOKENS:,} tokens per batch with train.block_size = "
            f"{self.block_size} (batch_size x block_size), to fit in memory",
            self.batch_size,
        )
        yield (
            self.max_iters <= self.eval_interval * MAX_EVALS,
            "eval_interval",
            f"at least train.max_iters / {MAX_EVALS:,} (at most {MAX_EVALS:,} evaluations)",
            self.eval_interval,
        )
        yield (
            self.processes == 1 or self.method == "minibatch",
            "processes",
            "1 with train.method counts (L-BFGS on the counts is one full batch)",
            self.processes,
        )
        yield (
            self.warmup_iters < self.max_iters,
            "warmup_iters",
            f"below train.max_iters = {self.max_iters}",
            self.warmup_iters,
        )


@dataclass(frozen=True)
class ModelParams:
    """Which model of the lecture, and a GPT's sizes (unused by the bigram). The GPT's context
    length is train.block_size, as in the lecture."""

    type: str = param((f"one of {MODEL_TYPES}", lambda value: value in MODEL_TYPES))
    n_layer: int = param(POSITIVE)
    n_head: int = param(POSITIVE)
    n_embd: int = param(POSITIVE)
    dropout: float = param(("in [0, 1)", lambda value: 0.0 <= value < 1.0))

    def joint_checks(self) -> Iterator[Check]:
        yield (
            self.n_embd % self.n_head == 0,
            "n_embd",
            f"a multiple of model.n_head = {self.n_head} (each head gets n_embd / n_head channels)",
            self.n_embd,
        )


@dataclass(frozen=True)
class SampleParams:
    """How the sample stage, the generate command and the served model sample, unless a
    request says otherwise (see pipeline.lm.sampling)."""

    num_chars: int = param(POSITIVE)
    seed: int = param(SEED)
    temperature: float = param(
        FINITE_POSITIVE,
        (
            f"at least {MIN_TEMPERATURE} (lower overflows the probabilities)",
            lambda value: value >= MIN_TEMPERATURE,
        ),
    )
    # Upper bound on one generation request, so a typo cannot ask for a billion characters.
    max_chars: int = param(
        POSITIVE,
        (f"at most {MAX_CHARS_LIMIT:,} (to fit in memory)", lambda value: value <= MAX_CHARS_LIMIT),
    )
    # 0: draw from every character; k: from the k most likely only (renormalised).
    top_k: int = param(("an integer >= 0 (0: off)", lambda value: value >= 0), default=0)

    def joint_checks(self) -> Iterator[Check]:
        yield (
            self.num_chars <= self.max_chars,
            "num_chars",
            f"at most sample.max_chars = {self.max_chars}",
            self.num_chars,
        )


@dataclass(frozen=True)
class TrackingParams:
    experiment_name: str = param(("non-empty", bool), STORE_NAME)
    # Empty: bigram-<data.name>, filled in by load_params.
    registered_model_name: str = param(
        (
            "a name MLflow's Model Registry accepts: non-empty, no '/' or ':', not '.' or '..'",
            registry_name,
        ),
        STORE_NAME,
    )


@dataclass(frozen=True)
class Params:
    data: DataParams
    model: ModelParams
    train: TrainParams
    sample: SampleParams
    tracking: TrackingParams

    def flat(self, *sections: str) -> dict[str, Any]:
        """The params of the named sections (default: all) as ``section.name: value``, the names
        `dvc params diff` shows, for logging: a URL's password is masked."""
        return {
            f"{name}.{key}": masked(value) if isinstance(value, str) else value
            for name in sections or [field.name for field in dataclasses.fields(self)]
            for key, value in dataclasses.asdict(getattr(self, name)).items()
        }


def load_params(path: Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml; raise PipelineError naming the first bad param."""
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise PipelineError(
            f"{path}: must be a mapping of sections (data, model, train, sample, tracking)"
        )
    section_types = typing.get_type_hints(Params)
    _reject_unknown_keys(raw, list(section_types), "", path)
    sections: dict[str, Any] = {}
    for name, section_type in section_types.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise PipelineError(f"{path}: '{name}' must be a mapping of params")
        if name == "tracking" and values.get("registered_model_name") == "":
            # One registered model per family and corpus: bigram-shakespeare, gpt-shakespeare.
            model_name = f"{sections['model'].type}-{sections['data'].name}"
            values = {**values, "registered_model_name": model_name}
        sections[name] = build_section(section_type, name, values, path)
    params = Params(**sections)
    _check_across_sections(params, path)
    return params


def _check_across_sections(params: Params, path: Path) -> None:
    if params.model.type != "bigram" and params.train.method == "counts":
        _reject(
            path,
            "train.method",
            f"minibatch for model.type {params.model.type} (counts fits a bigram's table)",
            params.train.method,
        )


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


def build_section(section_type: type, section_name: str, values: dict, path: Path):
    field_types = typing.get_type_hints(section_type)
    _reject_unknown_keys(values, list(field_types), f"{section_name}.", path)
    kwargs = {}
    for name, field_type in field_types.items():
        dotted = f"{section_name}.{name}"
        if name not in values:
            raise PipelineError(f"{path}: param '{dotted}' is required; add it to {path}")
        kwargs[name] = _typed(values[name], field_type, dotted, path)
    section = section_type(**kwargs)
    _check(section, section_name, path)
    return section


def _typed(value: Any, field_type: type, name: str, path: Path) -> Any:
    """value as field_type without lossy casts: 3.5 is no int, and bool is no number."""
    if field_type is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, field_type):
        kind = {int: "an integer", float: "a number", str: "a string"}[field_type]
        raise PipelineError(f"{path}: param '{name}' must be {kind}, got {value!r}")
    return value


def _check(section: Any, section_name: str, path: Path) -> None:
    """Each field against its rule, then the checks that tie fields together."""
    for field in dataclasses.fields(section):
        value = getattr(section, field.name)
        for rule, check in field.metadata["rules"]:
            if not check(value):
                _reject(path, f"{section_name}.{field.name}", rule, value)
    joint_checks = getattr(section, "joint_checks", lambda: ())
    for ok, name, rule, value in joint_checks():
        if not ok:
            _reject(path, f"{section_name}.{name}", rule, value)


def _reject(path: Path, name: str, rule: str, value: Any) -> None:
    raise PipelineError(f"{path}: param '{name}' must be {rule}, got {value!r}")


# Params checked against the corpus -------------------------------------------------------------
# Some rules need the text: how many distinct characters it has and how long it is. The vocab
# and train stages check them on the data they read; the check stage checks them earlier, on
# the vocab stage's manifest, whenever that manifest is of the corpus data.sha256 names.


def check_vocab_size(vocab_size: int, max_vocab_size: int) -> None:
    """Refuse a vocabulary whose V x V tables (train, evaluate) would not fit in memory.

    20,992 characters (the CJK block) would need 3.5 GB per float64 table, and the train stage
    holds several at once.
    """
    if vocab_size > max_vocab_size:
        table_gb = 8 * vocab_size**2 / 1e9
        raise PipelineError(
            f"the corpus has {vocab_size:,} distinct characters, above data.max_vocab_size = "
            f"{max_vocab_size:,}; raise it in params.yaml (each {vocab_size:,} x {vocab_size:,} "
            f"count table takes {table_gb:.1f} GB, and training holds several)"
        )


def split_sizes(num_tokens: int, train_fraction: float, corpus: Path) -> tuple[int, int]:
    """The lengths of the train split (the first data.train_fraction of the tokens) and the val
    split (the rest); each needs 2 tokens, one bigram, or more."""
    if num_tokens < 2:
        raise PipelineError(f"{corpus} holds {num_tokens} characters: it needs at least 2")
    num_train = int(train_fraction * num_tokens)
    num_val = num_tokens - num_train
    if num_train < 2 or num_val < 2:
        raise PipelineError(
            f"{corpus} is too short ({num_tokens} characters) to split with "
            f"data.train_fraction = {train_fraction}: each split needs 2 or more"
        )
    return num_train, num_val


def check_block_size(block_size: int, num_train: int, num_val: int) -> None:
    shortest = min(num_train, num_val)
    if block_size >= shortest:
        raise PipelineError(
            f"param 'train.block_size' must be shorter than the smaller split ({shortest} tokens), "
            f"got {block_size}; lower it or use a longer corpus"
        )


def check_against_corpus(params: Params, vocab_size: int, num_tokens: int, corpus: Path) -> None:
    """Every rule that ties a param to the corpus, as the vocab and train stages apply them."""
    check_vocab_size(vocab_size, params.data.max_vocab_size)
    num_train, num_val = split_sizes(num_tokens, params.data.train_fraction, corpus)
    check_block_size(params.train.block_size, num_train, num_val)
