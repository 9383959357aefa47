"""The DVC stages, one module each, run by dvc.yaml as ``python -m pipeline.stages.<stage>``.

In the graph's order: ``check`` (every param, before DVC removes any output) -> ``download``
(the corpus, verified) -> ``vocab`` (characters and token arrays) -> ``train`` (the model and
its loss curve) -> ``evaluate`` (exact losses, the next-character heatmap) -> ``register`` (the
logged and registered model, its aliases) -> ``sample`` (text), and ``link`` (names the MLflow
run of the workspace's model on every run, and ends with where to look).

Each ``main()`` reads its params and paths and calls named functions of ``pipeline.lm`` and
``pipeline.tracking``; no stage imports another.
"""
