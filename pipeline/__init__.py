"""Karpathy's character-level bigram and GPT language models as a DVC + MLflow pipeline.

Three sub-packages, by concern, over a few small base modules:

- ``stages``: one module per DVC stage, run as ``python -m pipeline.stages.<stage>`` (see
  dvc.yaml): check -> download -> vocab -> train -> evaluate -> register -> sample, and link.
  No stage imports another.
- ``lm``: the models and their maths (``bigram``, ``gpt``, ``sizes``, ``models``, ``counts``,
  ``tokens``, ``training``, ``lecture``, ``sampling``, ``heatmap``): no MLflow, no repository
  paths.
- ``tracking``: everything MLflow (``store``, ``processes``, ``runs``, ``lineage``,
  ``registry``, ``served_model``, ``served_model_entry``, ``rebuild``, ``run_record``).
- base: ``params`` (typed, validated params.yaml), ``paths`` (every input and output path),
  ``cli`` (how a stage runs: one-line failures, signals, no arguments), ``errors`` (the
  exceptions), ``files`` (atomic writes), ``secrets`` (masked passwords), ``git`` (every git
  command), ``determinism`` (the CPU kernel level and thread counts, pinned before torch loads).

``generate`` (``python -m pipeline.generate``) is the user's command for text from any trained
model.
"""

import gc
import sys

from pipeline.determinism import pin_environment

# `python -m pipeline.stages.<stage>` (sys.argv[0] is "-m" while Python finds the module): a
# stage is a short process that loads MLflow and torch, about 1,800 modules, in seconds. A stop
# signal in that time is one line and exit 130, and the stage ends with the dvc process that
# runs it.
# The garbage collector's passes over the modules' objects while they load free nothing;
# pipeline.cli.stage_entry_point turns it back on once the stage's imports are done.
if sys.argv[:1] == ["-m"]:
    gc.disable()
    from pipeline.cli import stop_cleanly_while_loading

    stop_cleanly_while_loading()

# Before any stage imports torch: torch reads the pins when it first dispatches a kernel.
pin_environment()
