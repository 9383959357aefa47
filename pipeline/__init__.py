"""Karpathy's character-level bigram language model as a DVC + MLflow pipeline.

Each stage is a module run as ``python -m pipeline.<stage>`` (see dvc.yaml): ``check`` (every
param, before DVC removes any output) -> ``download`` -> ``vocab`` -> ``train`` -> ``evaluate``
-> ``register`` -> ``sample``, and ``link`` (names the MLflow run of the workspace's model, on
every run, and ends with where to look). ``generate`` is the user's command for text from any
trained model.
No stage imports another; they share:

- ``paths`` (every input and output path), ``params`` (typed, validated params.yaml);
- ``model`` (the bigram model), ``counts`` (bigram counts and the exact losses they give),
  ``data`` (vocabulary, token files, batches), ``training`` (the loops), ``heatmap``,
  ``lecture`` (the lecture's plain loop, the reference the fast paths are checked against);
- ``tracking`` (the stages' MLflow runs), ``store`` (where the MLflow store is, opened safely),
  ``serving`` and ``generator_model`` (the logged and registered models), ``textgen`` (text in,
  text out, sampling defaults), ``runrecord`` (data/train/run.json), ``reproducibility`` (a
  run's rebuild record);
- ``cli`` (how a stage runs: one-line failures, signals, no arguments), ``errors`` (the
  exceptions), ``files`` (atomic writes), ``secrets`` (masked passwords), ``git`` (every git
  command), ``determinism`` (the CPU kernel level and thread counts, pinned before torch loads).
"""

import gc
import sys

from pipeline.determinism import pin_environment

# `python -m pipeline.<stage>` (sys.argv[0] is "-m" while Python finds the module): a stage is a
# short process that loads MLflow and torch, about 1,800 modules, in seconds. A stop signal in
# that time is one line and exit 130, and the stage ends with the dvc process that runs it.
# The garbage collector's passes over the modules' objects while they load free nothing;
# pipeline.cli.stage_entry_point turns it back on once the stage's imports are done.
if sys.argv[:1] == ["-m"]:
    gc.disable()
    from pipeline.cli import stop_cleanly_while_loading

    stop_cleanly_while_loading()

# Before any stage imports torch: torch reads the pins when it first dispatches a kernel.
pin_environment()
