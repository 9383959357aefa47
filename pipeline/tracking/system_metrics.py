"""MLflow's system metrics for a training run, sampled at a pace suited to the run's length.

MLflow's own monitor (``mlflow.system_metrics``) samples the CPU, memory, disk and network, and
each GPU's utilisation and memory where ``nvidia-ml-py`` is installed (``pip install .[gpu]``),
and logs them as ``system/...`` metrics that the run page's System metrics tab charts. It is on
for every training run; it is MLflow's own switch that turns it off,
``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false``, not a param: a param would be a dep of the train
stage, and turning the monitor off would then retrain a model it does not change.

MLflow samples every 10 s by default and logs a sample only once its interval has passed, so a
2-second bigram run would get none and an hour-long one 360. Here the first interval is 1 s, and
at each eval point it becomes the predicted length of the run over ``SAMPLES_PER_RUN``, within
[1 s, 10 s]. ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` fixes it instead, as MLflow documents.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator

from mlflow.environment_variables import (
    MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING,
    MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL,
)
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

PREFIX = "system/"
SAMPLES_PER_RUN = 100
MIN_INTERVAL_S = 1.0
MAX_INTERVAL_S = 10.0  # MLflow's default


class RunMonitor(SystemMetricsMonitor):
    """MLflow's monitor, paced to the run, and logging the sample under way when it stops."""

    def __init__(self, run_id: str) -> None:
        super().__init__(run_id, sampling_interval=MIN_INTERVAL_S)
        self.fixed = MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL.get() is not None
        self.started = time.monotonic()

    def pace(self, done: float) -> None:
        """Sample about SAMPLES_PER_RUN times over the run, whose length is predicted from the
        time the part done (a fraction in (0, 1]) took. The monitor waits its interval anew
        after each sample, so the change counts from the next one."""
        if self.fixed or done <= 0:
            return
        predicted_s = (time.monotonic() - self.started) / done
        self.sampling_interval = min(
            max(predicted_s / SAMPLES_PER_RUN, MIN_INTERVAL_S), MAX_INTERVAL_S
        )

    def finish(self) -> None:
        """Stop, logging the sample taken since the last one was logged: MLflow drops it, so a
        run shorter than one interval would have no system metrics at all."""
        if self._process is not None:
            self._shutdown_event.set()
            self._process.join()
            if under_way := self.aggregate_metrics():
                self.publish_metrics(under_way)
        super().finish()  # Logs what is still buffered.


def enabled() -> bool:
    """On unless MLflow's variable says false (MLflow's own default is off, ours on)."""
    variable = MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING
    return not variable.defined or bool(variable.get())


@contextlib.contextmanager
def system_metrics(run_id: str) -> Iterator[Callable[[float], None]]:
    """Monitor the run while the block runs, and give the block the monitor's ``pace``; the
    samples are logged when it ends, however it ends (the run is still open then)."""
    if not enabled():
        yield lambda done: None
        return
    # Best effort, and silent: MLflow says at INFO on stderr that it starts and stops and that
    # there is no GPU to watch, and warns when a sample cannot be logged; a store that fails
    # fails the stage's own writes too, whose one-line error is the one to read.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.CRITICAL)
    monitor = RunMonitor(run_id)
    monitor.start()
    try:
        yield monitor.pace
    finally:
        with contextlib.suppress(Exception):
            monitor.finish()
