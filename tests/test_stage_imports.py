"""Each stage pays only for what it uses (issue 13): the modules a real run loads, per stage.

Every stage runs for real, in `dvc repro`'s order, in a copy of the trained repo with a fresh
MLflow store (download fetches the corpus, train trains and registers a model, evaluate draws
its heatmap, ...), each as `python -m pipeline.stages.<stage>` in the repo, but started through
RECORDER, which runs the module exactly as `-m` does (runpy._run_module_as_main) and writes at
exit, to a JSON file:

- loaded: every module the process imported: sys.modules at exit (an atexit handler registered
  before the stage starts, so it runs after every handler MLflow or torch registers), plus every
  module an import statement loaded on the way (the "import" audit event), so that one dropped
  from sys.modules again still counts.
- direct: the imports that pipeline code itself executes (a wrapper around builtins.__import__,
  which every import statement calls, also for a module that is already loaded).
- chains: for each heavy module, the modules on the stack when it was first loaded, which the
  failure message shows (e.g. "torch (pipeline.lm.tokens <- pipeline.generate)").

Why not `-X importtime` on stderr: it prints only what the import statement machinery loads, so
a module loaded with importlib.import_module (as MLflow loads flavours and lazy modules) is
missing; it shows only the first import of a module, so it cannot tell what our own code imports
once MLflow has loaded it; and its lines share stderr with whatever the stage and the libraries
print there (child interpreters started with the same flags, such as multiprocessing's, add
their own). A file written by the stage process itself, at exit, has none of that.

Both checks matter because the libraries bring their own: `import mlflow` (3.17) loads pandas,
mlflow.data and tqdm, and `import torch` loads numpy and tqdm. A stage that opens an MLflow run
cannot avoid them, so the allow-list excuses exactly those (BROUGHT_BY), and only while a bare
import of that library in this venv does load them (measured by the `brought` fixture: after an
upgrade that drops them the excuse goes too). What the stage's own code imports has no excuse:
evaluate's code must not import tqdm even though torch loads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from testbed import copy_trained_repo
from tests.support.stages import dvc_yaml

# The third-party modules worth paying attention to: each costs from 0.05 s (tqdm) to seconds
# (torch, mlflow, pandas, matplotlib.pyplot) to import. A name counts when that module itself
# is loaded; our code imports it when it imports the module or any module under it.
HEAVY = (
    "torch",
    "numpy",
    "pandas",
    "matplotlib",
    "tqdm",
    "mlflow",
    "mlflow.data",
    "mlflow.pyfunc",
    "mlflow.pytorch",
)

# What a library loads by itself, which a stage that uses the library may therefore load. Each
# is excused only where the `brought` fixture sees a bare use of the library load it.
BROUGHT_BY = {
    # `import mlflow`: mlflow.artifacts -> mlflow.tracking.client ->
    # mlflow.entities.evaluation_dataset -> mlflow.data -> mlflow.data.pandas_dataset -> pandas
    # (-> numpy); tqdm comes through mlflow.genai.simulators (tqdm.auto).
    "mlflow": ("pandas", "numpy", "tqdm", "mlflow.data"),
    # `import torch`: torch._C loads numpy, torch.hub loads tqdm.
    "torch": ("numpy", "tqdm"),
    # matplotlib.cbook imports numpy.
    "matplotlib": ("numpy",),
}

# A bare use of each library, as little as a stage does with it: MLflow opens a SQLite store and
# logs into a run, since some of its modules load only when a store is opened.
PROBES = {
    "mlflow": """
import sys
import mlflow
mlflow.set_tracking_uri(f"sqlite:///{sys.argv[1]}/mlflow.db")
experiment_id = mlflow.create_experiment("probe")
with mlflow.start_run(experiment_id=experiment_id):
    mlflow.log_param("p", 1)
    mlflow.log_metric("m", 1.0)
    mlflow.log_text("text", "probe.txt")
mlflow.MlflowClient().search_runs([experiment_id])
""",
    "torch": "import torch\n",
    "matplotlib": "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot\n",
}

STAGES = (
    "check",
    "download",
    "vocab",
    "train",
    "evaluate",
    "register",
    "sample",
    "link",
    "generate",
    "leaderboard",
)
COMMANDS = ("generate", "leaderboard")  # pipeline/<name>.py, not stages
TRAINING = "pipeline.lm.training"  # The training loops: the train stage's alone.
HEATMAP = "pipeline.lm.heatmap"  # matplotlib: the evaluate stage's alone.
# The pyfunc generator (pandas, mlflow.pyfunc): logged by register, loaded by generate from an
# MLflow model.
SERVING = "pipeline.tracking.served_model"


def other_stages(stage: str) -> frozenset[str]:
    """No stage imports another: each is a module of its own for DVC to run."""
    return frozenset(module_of(other) for other in STAGES if other != stage)


def module_of(name: str) -> str:
    """The module `python -m` runs for a stage, or for a command (generate, leaderboard)."""
    return f"pipeline.{name}" if name in COMMANDS else f"pipeline.stages.{name}"


# `python -c BOOTSTRAP RECORDER ...` runs RECORDER in a namespace of its own: the module runs in
# __main__'s (as under -m), where a name of the recorder could clash with one of the module's.
BOOTSTRAP = "exec(__import__('sys').argv[1], {'__name__': '_import_recorder'})"
RECORDER = r"""
import atexit, builtins, dataclasses, json, os, runpy, sys

_, out_path, heavy, module, *args = sys.argv[1:]
heavy = set(json.loads(heavy))
loaded, direct, chains = set(), set(), {}


def module_name(frame_globals):
    spec = (frame_globals or {}).get("__spec__")
    return getattr(spec, "name", None) or (frame_globals or {}).get("__name__") or "?"


def on_audit(event, event_args):
    if event != "import":
        return
    name = event_args[0]
    loaded.add(name)
    if name in heavy and name not in chains:
        chain, frame = [], sys._getframe(1)
        while frame is not None:
            caller = module_name(frame.f_globals)
            internal = caller.startswith(("importlib", "_frozen_importlib", "runpy", "_import_"))
            if not internal and caller not in chain[-1:]:
                chain.append(caller)
            frame = frame.f_back
        chains[name] = chain


def recording_params(params_module):
    # load_params returns params whose every field records in params_read that it was read.
    def recording(section, values):
        fields = {field.name for field in dataclasses.fields(values)}

        class Recording(type(values)):
            def __getattribute__(self, name):
                if name in fields:
                    params_read.add(f"{section}.{name}")
                return object.__getattribute__(self, name)

        copy = object.__new__(Recording)
        for name in fields:
            object.__setattr__(copy, name, getattr(values, name))
        return copy

    load = params_module.load_params

    def load_params(*args, **kwargs):
        params = load(*args, **kwargs)
        sections = [field.name for field in dataclasses.fields(params)]
        recorded = {name: recording(name, getattr(params, name)) for name in sections}
        return params_module.Params(**recorded)

    params_module.load_params = load_params


params_read, params_recorded = set(), []
real_import = builtins.__import__


def recording_import(name, globals=None, locals=None, fromlist=(), level=0):
    imported = real_import(name, globals, locals, fromlist, level)
    # Once pipeline.params has run, and before the import statement that loaded it binds a name
    # from it (`from pipeline.params import load_params` reads the name after this returns).
    params_module = sys.modules.get("pipeline.params")
    loading = getattr(getattr(params_module, "__spec__", None), "_initializing", False)
    if params_module and not loading and not params_recorded:
        params_recorded.append(True)
        recording_params(params_module)
    importer = module_name(globals)
    if importer.split(".")[0] == "pipeline":
        absolute = name
        if level:
            base = (globals.get("__package__") or "").rsplit(".", level - 1)[0]
            absolute = f"{base}.{name}" if name else base
        direct.add((importer, absolute))
        for item in fromlist or ():
            if f"{absolute}.{item}" in sys.modules:
                direct.add((importer, f"{absolute}.{item}"))
    return imported


def dump():
    main = getattr(sys.modules.get("__main__"), "__spec__", None)
    with open(out_path, "w", encoding="utf-8") as out:
        json.dump(
            {
                "main": main.name if main else None,
                "loaded": sorted(loaded | set(sys.modules)),
                "direct": sorted(direct),
                "chains": chains,
                "params_read": sorted(params_read),
            },
            out,
        )


atexit.register(dump)  # First registered, so it runs last.
sys.addaudithook(on_audit)
builtins.__import__ = recording_import
# As `python -m`: the current directory first on sys.path, argv[0] becomes the module's file.
sys.path[0] = os.getcwd()
sys.argv = [module, *args]
runpy._run_module_as_main(module)
"""


@dataclass
class Imports:
    """What one process imported, read from RECORDER's file."""

    loaded: frozenset[str]
    direct: frozenset[tuple[str, str]]  # (pipeline module, module it imported)
    chains: dict[str, list[str]]
    main: str | None
    params_read: frozenset[str]  # "section.name" of every param the process read

    def heavy_loaded(self) -> set[str]:
        return {name for name in HEAVY if name in self.loaded}

    def heavy_imported_by_us(self) -> dict[str, set[str]]:
        """{heavy module: the pipeline modules whose own import statements import it}."""
        found: dict[str, set[str]] = {}
        for importer, target in self.direct:
            for name in HEAVY:
                if target == name or target.startswith(f"{name}."):
                    found.setdefault(name, set()).add(importer)
        return found

    def pipeline_modules(self) -> set[str]:
        modules = {name for name in self.loaded if name.split(".")[0] == "pipeline"}
        return modules | ({self.main} if self.main else set())

    def chain(self, name: str) -> str:
        """How it came to be loaded: the modules on the stack at its first import, innermost
        first (its importer, that one's importer or caller, ...; the middle of long ones cut)."""
        chain = self.chains.get(name) or ["?"]
        return " <- ".join(chain if len(chain) <= 6 else [*chain[:2], "...", *chain[-3:]])


def record_imports(
    module: str, args: list[str], cwd: Path, env: dict[str, str], dump: Path, timeout: int = 600
) -> tuple[subprocess.CompletedProcess, Imports | None]:
    result = subprocess.run(
        [sys.executable, "-c", BOOTSTRAP, RECORDER, str(dump), json.dumps(HEAVY), module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if not dump.is_file():
        return result, None
    record = json.loads(dump.read_text(encoding="utf-8"))
    imports = Imports(
        loaded=frozenset(record["loaded"]),
        direct=frozenset(tuple(pair) for pair in record["direct"]),
        chains=record["chains"],
        main=record["main"],
        params_read=frozenset(record["params_read"]),
    )
    return result, imports


@dataclass(frozen=True)
class Run:
    """One real run of a stage and what it may import.

    uses: the heavy modules it needs for its own work; everything else in HEAVY it must not
    load, save what BROUGHT_BY excuses for a library it uses, and its own code must not import.
    """

    name: str
    module: str
    uses: frozenset[str]
    must_not_load: frozenset[str]
    args: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()  # Removed before the run, checked after: it did its work.
    prepare: Callable[[Path], None] | None = None
    stdout_check: Callable[[str], bool] = field(default=lambda stdout: True)


def remove_run_record(repo: Path) -> None:
    (repo / "data/train/run.json").unlink()


def run_record_names_the_model(repo: Path) -> None:
    """The link stage's fast path needs run.json and run_model.json written for this model.pt
    (train just did)."""
    run_id = json.loads((repo / "data/train/run.json").read_text())["mlflow_run_id"]
    record = json.loads((repo / "data/train/run_model.json").read_text())
    sha256 = hashlib.sha256((repo / "data/train/model.pt").read_bytes()).hexdigest()
    assert record == {"mlflow_run_id": run_id, "model_sha256": sha256} and run_id, record


# In `dvc repro`'s order, each run on the outputs of the ones before it.
RUNS = (
    Run(
        "check",
        "pipeline.stages.check",
        # Reads params.yaml and the vocab stage's manifest: nothing heavy, no MLflow run.
        uses=frozenset(),
        must_not_load=other_stages("check") | {TRAINING, HEATMAP, SERVING},
        outputs=("data/check/params.json",),
        stdout_check=lambda stdout: "and against the corpus" in stdout,
    ),
    Run(
        "download",
        "pipeline.stages.download",
        # Fetches a file and logs the run: no tensors, no arrays, no plots.
        uses=frozenset({"mlflow"}),
        must_not_load=other_stages("download") | {TRAINING, HEATMAP, SERVING},
        outputs=("data/raw/input.txt", "data/raw/download.json"),
    ),
    Run(
        "vocab",
        "pipeline.stages.vocab",
        # Counts characters and writes the token arrays with numpy: no torch.
        uses=frozenset({"mlflow", "numpy"}),
        must_not_load=other_stages("vocab") | {TRAINING, HEATMAP, SERVING},
        outputs=(
            "data/vocab/vocab.json",
            "data/vocab/train.npy",
            "data/vocab/val.npy",
            "data/vocab/manifest.json",
        ),
    ),
    Run(
        "train",
        "pipeline.stages.train",
        # Trains (torch, tqdm's progress bar), writes the loss curve (pandas), links its datasets
        # (mlflow.data). No plot, and no model logged: that is register's job.
        uses=frozenset({"torch", "numpy", "pandas", "tqdm", "mlflow", "mlflow.data"}),
        must_not_load=other_stages("train") | {HEATMAP, SERVING},
        outputs=("data/train/model.pt", "data/train/loss_curve.csv", "data/train/run.json"),
    ),
    Run(
        "evaluate",
        "pipeline.stages.evaluate",
        # Exact losses (torch), the heatmap (matplotlib, fed numpy arrays), metrics into MLflow.
        uses=frozenset({"torch", "numpy", "matplotlib", "mlflow"}),
        must_not_load=other_stages("evaluate") | {TRAINING, SERVING},
        outputs=("data/evaluate/metrics.json", "data/evaluate/next_char_probs.png"),
    ),
    Run(
        "register",
        "pipeline.stages.register",
        # Logs the PyTorch model (torch) and the pyfunc generator, whose input example is a
        # DataFrame (pandas), and registers it. No training loop, no plot.
        uses=frozenset({"torch", "numpy", "pandas", "mlflow", "mlflow.pytorch", "mlflow.pyfunc"}),
        must_not_load=other_stages("register") | {TRAINING, HEATMAP},
        outputs=("data/register/sampling_defaults.json",),
    ),
    Run(
        "sample",
        "pipeline.stages.sample",
        # Generates with the model (torch; numpy comes with it) and logs the text into MLflow.
        uses=frozenset({"torch", "numpy", "mlflow"}),
        must_not_load=other_stages("sample") | {TRAINING, HEATMAP, SERVING},
        outputs=("data/sample/sample.txt",),
    ),
    Run(
        "link",
        "pipeline.stages.link",
        # The fast path of every no-op `dvc repro`: run.json already names this model and no run
        # is left RUNNING, so it reads the SQLite store with sqlite3 and imports nothing heavy.
        uses=frozenset(),
        must_not_load=other_stages("link") | {TRAINING, HEATMAP, SERVING},
        prepare=run_record_names_the_model,
    ),
    Run(
        "link-without-run-record",
        "pipeline.stages.link",
        # After DVC restores a model from its run-cache: it looks the run up through MLflow.
        uses=frozenset({"mlflow"}),
        must_not_load=other_stages("link") | {TRAINING, HEATMAP, SERVING},
        outputs=("data/train/run.json",),
        prepare=remove_run_record,
        stdout_check=lambda stdout: "was trained by MLflow run" in stdout,
    ),
    Run(
        "leaderboard",
        "pipeline.leaderboard",
        # Reads the store: MLflow's client, no torch (a GPT's size comes from lm.sizes).
        uses=frozenset({"mlflow"}),
        must_not_load=other_stages("leaderboard") | {TRAINING, HEATMAP, SERVING},
        stdout_check=lambda stdout: stdout.startswith("| # | run | model |"),
    ),
    Run(
        "generate-help",
        "pipeline.generate",
        # Prints the usage: nothing heavy at all.
        uses=frozenset(),
        must_not_load=other_stages("generate") | {TRAINING, HEATMAP, SERVING},
        args=("--help",),
        stdout_check=lambda stdout: stdout.startswith("usage: python -m pipeline.generate"),
    ),
    Run(
        "generate-model-pt",
        "pipeline.generate",
        # From data/train/model.pt and its vocab.json on disk: torch, but no MLflow store.
        uses=frozenset({"torch", "numpy"}),
        must_not_load=other_stages("generate") | {TRAINING, HEATMAP, SERVING},
        args=("--model", "data/train/model.pt", "--prompt", "ROMEO:", "--chars", "50"),
        stdout_check=lambda stdout: stdout.startswith("ROMEO:") and len(stdout) == 57,
    ),
    Run(
        "generate-registered-model",
        "pipeline.generate",
        # The registered pyfunc generator, fetched from the store: MLflow's pyfunc loader (which
        # needs pandas), the model class in pipeline.tracking.served_model, torch for the weights.
        # Not mlflow.pytorch: that loader is for the other flavour, runs:/<run id>/model.
        uses=frozenset({"torch", "numpy", "pandas", "mlflow", "mlflow.pyfunc"}),
        must_not_load=other_stages("generate") | {TRAINING, HEATMAP},
        args=("--model", "models:/bigram-shakespeare@champion", "--prompt", "ROMEO:"),
        stdout_check=lambda stdout: stdout.startswith("ROMEO:"),
    ),
)


@pytest.fixture(scope="module")
def brought(tmp_path_factory) -> dict[str, set[str]]:
    """{library: the heavy modules a bare use of it loads, among those BROUGHT_BY names}."""
    directory = tmp_path_factory.mktemp("probes")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    found = {}
    for library, code in PROBES.items():
        (directory / f"probe_{library}.py").write_text(code)
        result, imports = record_imports(
            f"probe_{library}", [str(directory)], directory, env, directory / f"{library}.json"
        )
        assert result.returncode == 0 and imports is not None, result.stderr[-3000:]
        found[library] = set(BROUGHT_BY[library]) & imports.heavy_loaded()
    return found


@pytest.fixture(scope="module")
def stage_runs(trained_repo, tmp_path_factory) -> dict[str, tuple]:
    """Every run of RUNS, in order, in one copy of the trained repo:
    {name: (completed process, Imports or None, outputs it failed to write)}."""
    trained, env = trained_repo
    directory = tmp_path_factory.mktemp("imports")
    repo = copy_trained_repo(trained, directory / "repo")
    runs = {}
    for run in RUNS:
        if run.prepare is not None:
            run.prepare(repo)
        for output in run.outputs:
            (repo / output).unlink(missing_ok=True)
        dump = directory / f"{run.name}.json"
        runs[run.name] = record_imports(run.module, list(run.args), repo, dict(env), dump)
        missing = [output for output in run.outputs if not (repo / output).is_file()]
        runs[run.name] += (missing,)
    return runs


def allowed_to_load(run: Run, brought: dict[str, set[str]]) -> set[str]:
    allowed = set(run.uses)
    for library in set(brought) & run.uses:
        allowed |= brought[library]
    return allowed


@pytest.mark.e2e
@pytest.mark.parametrize("run", RUNS, ids=[run.name for run in RUNS])
def test_a_stage_imports_only_what_it_uses(run: Run, stage_runs, brought):
    result, imports, missing = stage_runs[run.name]
    command = " ".join(["python -m", run.module, *run.args])
    assert result.returncode == 0 and imports is not None, (
        f"{command} exited {result.returncode}\n--- stderr\n{result.stderr[-3000:]}"
    )
    assert not missing, f"{command} did not write {missing}"
    assert run.stdout_check(result.stdout), f"{command} printed:\n{result.stdout[-2000:]}"
    assert imports.main == run.module, imports.main

    problems = []
    unexpected = imports.heavy_loaded() - allowed_to_load(run, brought)
    if unexpected:
        problems.append(
            "loads modules it does not use: "
            + "; ".join(f"{name} ({imports.chain(name)})" for name in sorted(unexpected))
        )
    ours = {
        name: importers
        for name, importers in imports.heavy_imported_by_us().items()
        if name not in run.uses
    }
    if ours:
        problems.append(
            "its own code imports modules it does not use: "
            + "; ".join(
                f"{name} (imported by {', '.join(sorted(importers))})"
                for name, importers in sorted(ours.items())
            )
        )
    forbidden = imports.pipeline_modules() & run.must_not_load
    if forbidden:
        problems.append(f"loads pipeline modules it must not: {', '.join(sorted(forbidden))}")
    assert not problems, f"`{command}` ({run.name}) " + "\n  ".join(["", *problems])


def covers(entry: str, name: str) -> bool:
    """dvc.yaml's params entry (a section or a param) covers the param section.name."""
    return name == entry or name.startswith(f"{entry}.")


@pytest.mark.e2e
def test_each_stage_declares_the_params_it_reads(stage_runs):
    """Each stage ran with params that record which of them are read (RECORDER): dvc.yaml must
    declare every param a stage reads, and nothing it does not read, so that DVC reruns a stage
    on a change to any param it depends on and on no other."""
    declared = {name: spec.get("params", []) for name, spec in dvc_yaml()["stages"].items()}
    stage_of = {
        run.name: run.module.removeprefix("pipeline.stages.")
        for run in RUNS
        if run.module.startswith("pipeline.stages.")
    }
    assert set(stage_of.values()) == set(declared)
    for name, stage in stage_of.items():
        _, imports, _ = stage_runs[name]
        assert imports is not None, name
        read, entries = imports.params_read, declared[stage]
        undeclared = {param for param in read if not any(covers(e, param) for e in entries)}
        assert not undeclared, (name, sorted(undeclared))
        # The link stage's fast path reads less than the look-up through MLflow that it skips.
        if name != "link":
            unread = {e for e in entries if not any(covers(e, param) for param in read)}
            assert not unread, (name, sorted(unread))


def test_every_runnable_module_runs_through_the_stage_entry_point():
    """pipeline/__init__.py turns the garbage collector off in a `python -m pipeline.<module>`
    process until cli.stage_entry_point turns it back on: a module run another way would run
    with it off."""
    package = Path(__file__).resolve().parent.parent / "pipeline"
    runnable = {
        path.stem: path.read_text(encoding="utf-8")
        for path in package.rglob("*.py")
        if 'if __name__ == "__main__":' in path.read_text(encoding="utf-8")
    }
    assert set(runnable) == set(STAGES)
    for name, source in runnable.items():
        main_block = source.split('if __name__ == "__main__":', 1)[1]
        assert "stage_entry_point(main" in main_block, name
