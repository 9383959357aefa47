"""Text in, text out: a trained model with its vocabulary, continuing prompts.

Shared by the sample stage, the generate command and the model MLflow serves, so that all three
encode prompts, bound requests and sample the same way.

Sampling defaults have one source: the ``sample`` section of params.yaml. The sample stage reads
it; the register stage stores it with both logged models (``sampling_defaults.json``), so a
model fetched from MLflow samples with the defaults it was registered with, whatever the current
directory's params.yaml says; ``model.pt`` in the workspace uses params.yaml, which `dvc repro`
keeps in step with it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import PipelineError
from pipeline.lm.models import LanguageModel, context_length
from pipeline.params import MAX_SEED, MIN_TEMPERATURE, SampleParams, build_section

# The lecture starts generation from token 0, a newline; an empty prompt does the same.
START_CHAR = "\n"
SAMPLING_DEFAULTS_FILE = "sampling_defaults.json"
# Bounds on one request of the served model besides sample.max_chars. Each row costs about a
# millisecond whatever its length (the probability table is built per row), so 100,000 short
# rows took 57 s and hit the scoring server's 60-s time-out; 1,000 rows answer in a few seconds
# on a busy 2-core machine. Prompts are echoed, not generated, so they are bounded apart.
MAX_REQUEST_ROWS = 1_000
MAX_PROMPT_CHARS = 1_000_000


def write_sampling_defaults(sample: SampleParams, directory: Path) -> Path:
    path = directory / SAMPLING_DEFAULTS_FILE
    path.write_text(json.dumps(dataclasses.asdict(sample), indent=2) + "\n", encoding="utf-8")
    return path


def read_sampling_defaults(path: Path) -> SampleParams:
    """The sampling defaults stored with a model, checked as params.yaml's sample section is:
    they bound what a request may ask (sample.max_chars), so a model file must not lift that."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise PipelineError(f"{path} is not a file of sampling defaults ({reason})") from None
    if not isinstance(values, dict):
        raise PipelineError(f"{path} is not a file of sampling defaults (not a JSON object)")
    # Models registered before sample.top_k existed sample from every character.
    return build_section(SampleParams, "sample", {"top_k": 0, **values}, path)


@dataclass(frozen=True)
class TextGenerator:
    model: LanguageModel
    chars: list[str]
    # What a request leaves out: the sample params the model was registered with.
    defaults: SampleParams

    def request(
        self,
        prompt: Any = "",
        num_chars: Any = None,
        temperature: Any = None,
        seed: Any = None,
        top_k: Any = None,
    ) -> Request:
        """A checked request, its missing fields (None) taken from the defaults."""
        defaults = self.defaults
        return checked_request(
            prompt,
            defaults.num_chars if num_chars is None else num_chars,
            defaults.temperature if temperature is None else temperature,
            defaults.seed if seed is None else seed,
            defaults.max_chars,
            defaults.top_k if top_k is None else top_k,
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of text; characters the model never saw are an error that names them."""
        index = {char: i for i, char in enumerate(self.chars)}
        unknown = sorted({char for char in text if char not in index})
        if unknown:
            listed = ", ".join(repr(char) for char in unknown)
            raise PipelineError(
                f"prompt has characters outside the model's vocabulary of {len(self.chars)}: "
                f"{listed}; remove or replace them"
            )
        return [index[char] for char in text]

    def complete(self, request: Request) -> str:
        return self.generate(
            request.prompt, request.num_chars, request.temperature, request.seed, request.top_k
        )

    def generate(
        self, prompt: str, num_chars: int, temperature: float, seed: int, top_k: int = 0
    ) -> str:
        """The prompt followed by num_chars sampled characters (seeded: same seed, same text).

        The model sees as much of the prompt's end as it can use: a bigram its last character,
        a GPT its last block_size. An empty prompt starts from a newline, which is not returned.
        """
        prompt_ids = self.encode(prompt)
        if num_chars == 0:
            return prompt
        context_ids = prompt_ids[-context_length(self.model) :] or [self._start_id()]
        context = torch.tensor([context_ids], dtype=torch.long)
        generator = torch.Generator().manual_seed(seed)
        tokens = self.model.generate(
            context, num_chars, temperature=temperature, generator=generator, top_k=top_k
        )
        return prompt + "".join(self.chars[i] for i in tokens[0, len(context_ids) :].tolist())

    def _start_id(self) -> int:
        return self.chars.index(START_CHAR) if START_CHAR in self.chars else 0


@dataclass(frozen=True)
class Request:
    """One generation request, checked: what TextGenerator.generate takes."""

    prompt: str
    num_chars: int
    temperature: float
    seed: int
    top_k: int = 0


def checked_request(
    prompt: Any, num_chars: Any, temperature: Any, seed: Any, max_chars: int, top_k: Any = 0
) -> Request:
    """Check the type and range of every field before any work, whoever sent them.

    Values may come from JSON through pandas (the served model), where an integer column with a
    gap becomes float: 300.0 is 300, but 1.5 and 1e30 are errors, not truncated or wrapped.
    """
    if not isinstance(prompt, str):
        raise PipelineError(f"prompt must be a string, got {prompt!r}")
    chars = _integer(num_chars, "chars")
    if chars < 0:
        raise PipelineError(f"chars must be 0 or more, got {chars}")
    if chars > max_chars:
        raise PipelineError(
            f"{chars:,} characters requested, above the limit sample.max_chars = "
            f"{max_chars:,}; ask for fewer or raise sample.max_chars in params.yaml"
        )
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, numbers.Real)
        or not (math.isfinite(temperature) and float(temperature) >= MIN_TEMPERATURE)
    ):
        raise PipelineError(
            f"temperature must be a finite number of at least {MIN_TEMPERATURE}, "
            f"got {temperature!r}"
        )
    checked_seed = _integer(seed, "seed")
    if not 0 <= checked_seed < MAX_SEED:
        raise PipelineError(f"seed must be an integer in [0, 2**63), got {checked_seed}")
    checked_top_k = _integer(top_k, "top_k")
    if checked_top_k < 0:
        raise PipelineError(f"top_k must be 0 (off) or more, got {checked_top_k}")
    return Request(prompt, chars, float(temperature), checked_seed, checked_top_k)


def check_row_count(rows: int) -> None:
    """Bound the rows of a request before any row is read: checking alone costs per row."""
    if rows > MAX_REQUEST_ROWS:
        raise PipelineError(
            f"{rows:,} rows in one request, above the limit of {MAX_REQUEST_ROWS:,} rows "
            "(pipeline.lm.sampling.MAX_REQUEST_ROWS); split the request"
        )


def check_total(requests: Sequence[Request], max_chars: int) -> None:
    """Bound a batch as a whole: many rows of max_chars each would be one huge request."""
    check_row_count(len(requests))
    total = sum(request.num_chars for request in requests)
    if total > max_chars:
        raise PipelineError(
            f"{total:,} characters requested in {len(requests)} rows, above the limit "
            f"sample.max_chars = {max_chars:,} per request; ask for fewer or split the request"
        )
    prompt_chars = sum(len(request.prompt) for request in requests)
    if prompt_chars > MAX_PROMPT_CHARS:
        raise PipelineError(
            f"prompts of {prompt_chars:,} characters in {len(requests)} rows, above the limit "
            f"of {MAX_PROMPT_CHARS:,} (pipeline.lm.sampling.MAX_PROMPT_CHARS); a model reads at "
            "most a prompt's last block of characters, so shorten the prompts or split the request"
        )


def _integer(value: Any, name: str) -> int:
    """value as an int, or an error naming it; bool is no integer, 2.0 is one."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    # numbers.Integral also takes numpy's integers, which pandas may hand over.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise PipelineError(f"{name} must be an integer, got {value!r}")
    return int(value)
