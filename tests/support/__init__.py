"""Everything the tests share besides their fixtures (tests/conftest.py): one module per concern.

No test module imports another; they import from here and from testbed (the repo copies and
processes that the benchmarks share too, at the repository root).

- experiments: queueing `dvc exp run`s and checking what they left in MLflow.
- faults: real faults (a full file system, a file size limit, a password-asking server) and
  the search for a secret in everything a run leaves behind.
- markov: text from a known Markov chain, whose entropy rate is a bigram's lowest loss.
- params: params.yaml files with some values replaced, and the error loading one gives.
- servers: HTTP servers and clients on 127.0.0.1: the faulty corpus server, a background
  server process, a small JSON client.
- stages: stages run the way a user runs them: an endless training to interrupt, `dvc exp run`;
  and dvc.yaml, where they are declared.
- models: a tiny model and vocabulary in a project directory, logged as the pipeline's
  generator.
- store: what a run left in an MLflow store.
"""
