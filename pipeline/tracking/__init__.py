"""Everything MLflow (and the records that point into it), split by idea.

- ``store``: where the MLflow store is, and opening it safely (SQLite checks, server and
  database probes); standard library only at import, so fast stages stay fast.
- ``processes``: which process a run belongs to, and whether it has gone (standard library).
- ``runs``: the stages' runs, which always end, and the one reaper of runs that killed stages
  left RUNNING (``end_runs_of_dead_processes``).
- ``lineage``: what a run consumed and made: datasets, the sha256 tags later stages find a run
  by, the loss curve on runs and on logged models.
- ``checkpoints``: a training run's checkpoints as logged models, and a resumed run's tags.
- ``system_metrics``: MLflow's system metrics monitor on a training run, paced to its length.
- ``registry``: logging both model flavours, registering a version, the champion/challenger
  aliases.
- ``served_model``: the pyfunc MLflow serves (prompts in, text out), and
  ``served_model_entry``, the file MLflow runs to rebuild it (models-from-code).
- ``rebuild``: what a training run needs to be rebuilt, as run tags and an artifact.
- ``run_record``: data/train/run.json and registered.json, which name the workspace model's run.

Nothing is imported here: ``store`` and ``processes`` must load without MLflow.
"""
