"""Text in, text out: a trained model with its vocabulary, continuing prompts.

Shared by the sample stage, the generate command and the model MLflow serves, so that all three
encode prompts, bound requests and sample the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.errors import PipelineError
from pipeline.model import BigramLanguageModel

# The lecture starts generation from token 0, a newline; an empty prompt does the same.
START_CHAR = "\n"


@dataclass(frozen=True)
class TextGenerator:
    model: BigramLanguageModel
    chars: list[str]

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

    def generate(self, prompt: str, num_chars: int, temperature: float, seed: int) -> str:
        """The prompt followed by num_chars sampled characters (seeded: same seed, same text).

        A bigram model only looks at the last character, so the prompt's last character seeds
        the sampling; an empty prompt starts from a newline, which is not returned.
        """
        prompt_ids = self.encode(prompt)
        if num_chars == 0:
            return prompt
        start_id = prompt_ids[-1] if prompt_ids else self._start_id()
        context = torch.tensor([[start_id]], dtype=torch.long)
        generator = torch.Generator().manual_seed(seed)
        tokens = self.model.generate(
            context, num_chars, temperature=temperature, generator=generator
        )
        return prompt + "".join(self.chars[i] for i in tokens[0, 1:].tolist())

    def _start_id(self) -> int:
        return self.chars.index(START_CHAR) if START_CHAR in self.chars else 0


def check_request(num_chars: int, temperature: float, max_chars: int) -> None:
    """Reject a request before any work: negative or above the sample.max_chars bound."""
    if num_chars < 0:
        raise PipelineError(f"number of characters must be 0 or more, got {num_chars}")
    if num_chars > max_chars:
        raise PipelineError(
            f"{num_chars:,} characters requested, above the limit sample.max_chars = "
            f"{max_chars:,}; ask for fewer or raise sample.max_chars in params.yaml"
        )
    if not temperature > 0:
        raise PipelineError(f"temperature must be > 0, got {temperature}")
