"""Karpathy's character-level bigram language model as a DVC + MLflow pipeline.

Each stage is a module run as ``python -m pipeline.<stage>`` (see dvc.yaml):
download -> vocab -> train -> evaluate -> sample, and link (names the MLflow run of the
model, on every run). Shared pieces live beside them:
``params`` (typed, validated params.yaml), ``model`` (the bigram model), ``data``
(token files, batches, bigram counts), ``tracking`` (MLflow), ``files`` (atomic writes)
and ``errors`` (one-line failures).
"""
