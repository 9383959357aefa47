"""params.yaml files with some values replaced, and the error loading a bad one gives."""

from __future__ import annotations

from pathlib import Path

import pytest
from ruamel.yaml import YAML

from pipeline.errors import PipelineError
from pipeline.params import load_params
from testbed import write_committed_params


def write_params(tmp_path: Path, **overrides) -> Path:
    """The repo's params.yaml with some values replaced: {"train.lr": 0} or {"train.lrr": 1}."""
    yaml = YAML()
    params = yaml.load(write_committed_params(tmp_path))
    for dotted, value in overrides.items():
        section, _, name = dotted.partition(".")
        if name:
            params[section][name] = value
        elif value is None:
            del params[section]
        else:
            params[section] = value
    path = tmp_path / "params.yaml"
    yaml.dump(params, path)
    return path


def load_error(path: Path) -> str:
    """The one-line error loading path gives, which starts with the path."""
    with pytest.raises(PipelineError) as raised:
        load_params(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: "), message
    return message
