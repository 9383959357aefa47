"""Stage 5, register: log the trained model in MLflow as a servable model, and register it.

A stage of its own, so that what only serving needs (the ``sample`` params, which become the
served model's defaults, the registry name and the serving code) never retrains the model:
`dvc exp run -S sample.temperature=0.8` reruns this stage and sample, and registers a new version
holding the same weights and the new defaults.

The two flavours (pipeline.tracking.registry) are logged into the stage's own child run of the
training run (found by model.pt's sha256), beside evaluate's metrics at the training's last step,
which MLflow then links to the logged models. The version is tagged with the training run
(``training_run_id``), whose params and loss curve it was made with, and with the sha256 of the
weights and of the defaults, by which the link stage finds the version that serves exactly the
workspace's model.

data/register/sampling_defaults.json, the defaults the served model carries, is the stage's DVC
output: the same bytes for the same ``sample`` params. The version and its aliases are not (the
registry numbers versions), so they go to data/train/registered.json
(pipeline/tracking/run_record.py), which the link stage's summary prints.
"""

from __future__ import annotations

import mlflow

from pipeline.cli import stage_entry_point
from pipeline.files import file_sha256, outputs_removed_on_failure, read_json
from pipeline.lm.models import load_model
from pipeline.lm.sampling import write_sampling_defaults
from pipeline.lm.tokens import load_vocab
from pipeline.params import load_params
from pipeline.paths import METRICS_PATH, MODEL_PATH, SAMPLING_DEFAULTS_PATH, VOCAB_PATH
from pipeline.tracking import lineage, registry, run_record, runs

# What the version's tags and description, and the champion alias, take from metrics.json.
LOSSES = {"train_loss": float, "val_loss": float}


def main() -> None:
    params = load_params()
    chars = load_vocab(VOCAB_PATH)
    model = load_model(MODEL_PATH, len(chars))
    metrics = read_json(METRICS_PATH, LOSSES)
    losses = {name: metrics[name] for name in LOSSES}
    model_sha256 = file_sha256(MODEL_PATH)
    training_run = lineage.training_run_id(params, model_sha256)
    # The step of the training's final losses: metrics logged there are linked to the models.
    step = lineage.last_step(training_run, "val_loss")

    with (
        runs.model_run("register", params, training_run, params.flat("sample")) as run,
        outputs_removed_on_failure(SAMPLING_DEFAULTS_PATH),
    ):
        # MLflow links these to the models it logs next; the losses follow with their datasets.
        mlflow.log_metrics({k: v for k, v in metrics.items() if k not in LOSSES}, step=step)
        SAMPLING_DEFAULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
        write_sampling_defaults(params.sample, SAMPLING_DEFAULTS_PATH.parent)
        # The link stage finds a version by these (pipeline/stages/link.py).
        version_tags = {
            lineage.TRAINING_RUN_TAG: training_run,
            lineage.MODEL_TAG: model_sha256,
            lineage.SAMPLING_DEFAULTS_TAG: file_sha256(SAMPLING_DEFAULTS_PATH),
        }
        model_ids, registration = registry.log_and_register(
            model, SAMPLING_DEFAULTS_PATH, params, training_run, losses, step, version_tags
        )
        lineage.log_model_losses(training_run, losses, step, model_ids)
    run_record.write_registration(
        training_run,
        run.info.experiment_id,
        registration.model_name,
        registration.version,
        registration.aliases,
    )
    aliases = "".join(f" @{alias}" for alias in registration.aliases)
    print(f"registered {registration.model_name} version {registration.version}{aliases}")


if __name__ == "__main__":
    stage_entry_point(main, __doc__)()
