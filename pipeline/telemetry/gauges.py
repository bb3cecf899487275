"""What the Ray dashboard, Prometheus and Grafana see of a run: `ray.util.metrics` gauges.

Every gauge is named `lamina_<what>` (Prometheus shows it as `ray_lamina_<what>`) and carries the tags
`run` (the run id, also in the stage actors' names) and `stage` (0 = bottom). Layer metrics add `layer`
(0-based, as in the run's metrics log), since a stage may hold several layers.

    set inside each stage actor, once per micro-batch, from its StepReport (pipeline/stage.py):
      lamina_loss, lamina_pos, lamina_neg, lamina_over, lamina_spread   per layer (workers/objectives.py)
      lamina_microbatches_per_s, lamina_busy_fraction                   per stage, over a sliding window
      lamina_giving_way                                                 per stage: 1 at SCHED_IDLE
    set by the driver:
      lamina_queue_depth   micro-batches handed to the stage and not yet finished by it (its input channel)

A gauge is process-local; Ray's metrics agent on each node collects it from the process that sets it,
so a stage's gauges are created inside its actor. Setting one costs a few microseconds — next to a
stage step of milliseconds, it is set on every micro-batch rather than throttled.
"""

from __future__ import annotations

from collections.abc import Iterable

from ray.util.metrics import Gauge

from pipeline.stage import StepReport

PREFIX = "lamina_"

LAYER_GAUGES = {
    "loss": "local loss of the layer",
    "pos": "mean squared distance between consecutive frames of a clip (unit embeddings, 0..4)",
    "neg": "mean squared distance between frames of different clips (unit embeddings, 0..4)",
    "over": "fraction of consecutive-frame pairs farther apart than the layer's delta",
    "spread": "feature spread across the micro-batch: ~1 healthy, -> 0 on collapse",
}
STAGE_GAUGES = {
    "microbatches_per_s": "micro-batches the stage finished per second (sliding window)",
    "busy_fraction": "fraction of wall time the stage spent stepping (sliding window)",
    "giving_way": "1 while the stage has slack and its stepping thread gives way to other processes "
                  "(SCHED_IDLE, pipeline/slack.py)",
}
DRIVER_GAUGES = {
    "queue_depth": "micro-batches handed to the stage and not yet finished by it",
}
RUN_GAUGES = {
    "recoveries": "lost stage actors the run recovered from (replaced and restored from a checkpoint)",
    "checkpoint_failures": "barrier checkpoints that could not be written",
}


class StageGauges:
    """The gauges of one stage actor; `record` takes each of its StepReports."""

    def __init__(self, run_id: str, stage: int) -> None:
        tags = {"run": run_id, "stage": str(stage)}
        self._layer = {name: _gauge(name, text, ("run", "stage", "layer"), tags)
                       for name, text in LAYER_GAUGES.items()}
        self._stage = {name: _gauge(name, text, ("run", "stage"), tags)
                       for name, text in STAGE_GAUGES.items()}

    def record(self, report: StepReport) -> None:
        for layer in report.layers:
            tag = {"layer": str(layer.layer)}
            for name, gauge in self._layer.items():
                gauge.set(getattr(layer, name), tags=tag)
        self._stage["microbatches_per_s"].set(report.rate)
        self._stage["busy_fraction"].set(report.busy)
        self._stage["giving_way"].set(float(report.giving_way))


class DriverGauges:
    """The driver's gauges: the depth of each stage's input channel, and the run's recoveries and failed
    checkpoints (tagged `run` only)."""

    def __init__(self, run_id: str) -> None:
        self._depth = _gauge("queue_depth", DRIVER_GAUGES["queue_depth"], ("run", "stage"), {"run": run_id})
        self._run = {name: _gauge(name, text, ("run",), {"run": run_id}) for name, text in RUN_GAUGES.items()}
        for gauge in self._run.values():
            gauge.set(0)

    def queue_depths(self, depths: Iterable[int]) -> None:
        for stage, depth in enumerate(depths):
            self._depth.set(depth, tags={"stage": str(stage)})

    def run_counts(self, recoveries: int, checkpoint_failures: int) -> None:
        self._run["recoveries"].set(recoveries)
        self._run["checkpoint_failures"].set(checkpoint_failures)


def _gauge(name: str, description: str, tag_keys: tuple[str, ...], default_tags: dict[str, str]) -> Gauge:
    gauge = Gauge(PREFIX + name, description=description, tag_keys=tag_keys)
    gauge.set_default_tags(default_tags)
    return gauge
