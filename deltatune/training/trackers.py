"""Experiment trackers: `--report-to tensorboard,mlflow,wandb` (any subset), through accelerate's trackers.

What each run sends (rank 0 only, as it writes metrics.jsonl): its resolved config (the settings of OUT/config.yaml,
nested ones flattened as `method_options.r`) once; every record of metrics.jsonl with its numbers, at its step —
`loss` (the mean over the last `log_every` steps, the value in metrics.jsonl), `lr`, `examples_per_s`, and each
evaluation's metrics as `eval/<metric>`; at the end the best delta as an artifact where the tracker keeps files
(MLflow: `delta/` beside `config.yaml` and `summary.json`; W&B: an Artifact of type "model"). TensorBoard has
no artifacts.

Where the records go: TensorBoard `OUT/tensorboard/` (`tensorboard --logdir OUT`); MLflow `$MLFLOW_TRACKING_URI`,
else a file store in `OUT/mlruns` (`compare` points every cell at `COMPARE_OUT/mlruns`), experiment "deltatune"
(or `$MLFLOW_EXPERIMENT_NAME`), the run named after the run folder; W&B project "deltatune" (or `$WANDB_PROJECT`),
files in OUT/wandb; with no account here, `WANDB_MODE=offline` keeps them on disk for `wandb sync`.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltatune.errors import TrackerError

PROJECT = "deltatune"


@dataclass(frozen=True)
class TrackerPackage:
    module: str  # what must import
    pip: str  # the pin of requirements.txt


TRACKERS = {
    "tensorboard": TrackerPackage("tensorboard", "tensorboard==2.21.0"),
    "mlflow": TrackerPackage("mlflow", "mlflow-skinny==3.18.0"),
    "wandb": TrackerPackage("wandb", "wandb==0.31.0"),
}


def check_trackers(names: list[str] | None) -> list[str]:
    """The trackers named, each known and its package importable; else a `TrackerError` with the fix."""
    names = [name.strip().lower() for name in names or [] if name.strip()]
    unknown = [name for name in names if name not in TRACKERS]
    if unknown:
        raise TrackerError(f"--report-to {','.join(unknown)}: unknown tracker; choose from {', '.join(TRACKERS)} "
                           f"(comma-separated, e.g. --report-to tensorboard,mlflow)")
    for name in names:
        if importlib.util.find_spec(TRACKERS[name].module) is None:
            raise TrackerError(f"--report-to {name} needs the {TRACKERS[name].module} package, which is not "
                               f"installed: pip install {TRACKERS[name].pip}")
    return list(dict.fromkeys(names))


def make_trackers(names: list[str] | None, out: Path) -> list:
    """accelerate tracker objects for `Accelerator(log_with=...)`, writing where the module docstring says."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    made = []
    for name in check_trackers(names):
        if name == "tensorboard":  # TensorBoardTracker writes to logging_dir/run_name
            made.append(TensorBoardTracker(run_name="tensorboard", logging_dir=str(out)))
        elif name == "mlflow":
            made.append(MLflowTracker(experiment_name=PROJECT, run_name=out.resolve().name))
        else:
            made.append(WandBTracker(run_name=os.environ.get("WANDB_PROJECT", PROJECT), name=out.resolve().name,
                                     dir=str(out)))
    return made


def share_mlflow_store(names: list[str] | None, out: Path) -> None:
    """`compare`: every cell's MLflow run in one store, OUT/mlruns (unless $MLFLOW_TRACKING_URI names one), through
    the environment the cells' subprocesses inherit."""
    if "mlflow" in check_trackers(names) and not os.environ.get("MLFLOW_TRACKING_URI"):
        os.environ["MLFLOW_TRACKING_URI"] = default_mlflow_store(out)


def default_mlflow_store(out: Path) -> str:
    """The file store OUT/mlruns. MLflow 3 keeps file stores in maintenance mode and refuses them unless
    $MLFLOW_ALLOW_FILE_STORE is true: set here, for this default only (a database store needs sqlalchemy, which
    mlflow-skinny leaves out, and a server; `mlflow migrate-filestore` moves the runs into one later)."""
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return (out / "mlruns").resolve().as_uri()


def start_trackers(accelerator, config: dict[str, Any], out: Path) -> None:
    """Start the trackers of `Accelerator(log_with=make_trackers(...))` and send them the run's config."""
    if not accelerator.log_with or not accelerator.is_main_process:
        return
    if any(type(t).__name__ == "MLflowTracker" for t in accelerator.log_with):
        import mlflow

        # set each time: an earlier run of this process may have set another store
        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or default_mlflow_store(out))
    if any(type(t).__name__ == "WandBTracker" for t in accelerator.log_with):
        (out / "wandb").mkdir(parents=True, exist_ok=True)  # wandb.init(dir=...) needs the folder
    accelerator.init_trackers(PROJECT, config=flat_config(config))


def flat_config(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"method_options": {"r": 8}} -> {"method_options.r": 8}; lists and None as text (TensorBoard's hparams take
    numbers, booleans and strings only)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value if isinstance(value, bool | int | float | str) else str(value)
    return flat


def log_record(accelerator, record: dict[str, Any]) -> None:
    """One metrics.jsonl record's numbers at its step: {"step": 10, "loss": .., "eval": {"accuracy": ..}} ->
    loss, eval/accuracy."""
    if not accelerator.trackers:
        return
    values = {key: value for key, value in record.items()
              if key != "step" and isinstance(value, int | float) and not isinstance(value, bool)}
    for name, value in (record.get("eval") or {}).items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            values[f"eval/{name}"] = value
    if values:
        accelerator.log(values, step=record["step"])


def log_delta(accelerator, out: Path, task: str) -> None:
    """The best delta (OUT/delta) as an artifact: MLflow `delta/` (with config.yaml and summary.json), W&B an
    Artifact of type "model"."""
    delta = out / "delta"
    for tracker in accelerator.trackers if delta.is_dir() else []:
        if tracker.name == "mlflow":
            import mlflow

            mlflow.log_artifacts(str(delta), artifact_path="delta")
            for name in ("config.yaml", "summary.json"):
                if (out / name).is_file():
                    mlflow.log_artifact(str(out / name))
        elif tracker.name == "wandb":
            import wandb

            artifact = wandb.Artifact(re.sub(r"[^A-Za-z0-9_.-]", "_", f"{task}-delta"), type="model")
            artifact.add_dir(str(delta))
            tracker.run.log_artifact(artifact)


def finish_trackers(accelerator) -> None:
    """Close every tracker (flush TensorBoard, end the MLflow and W&B runs). Not `accelerator.end_training()`, which
    would also end the process group of a multi-process run."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []
