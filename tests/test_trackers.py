"""`--report-to` (deltatune/training/trackers.py): what TensorBoard and MLflow hold, read back with their own readers,
equals metrics.jsonl; the config and the delta reach MLflow; W&B runs offline; a missing package names its pip
command; `compare` hands the trackers to every cell."""

from __future__ import annotations

import importlib.util
import json

import pytest

from deltatune.errors import TrackerError
from deltatune.training import trackers
from deltatune.training.loop import TrainConfig, train


def tracked_run(model_dir, data_file, out, report_to: list[str]) -> list[dict]:
    train(TrainConfig(
        model=str(model_dir), task="csv", method="lora", out=str(out), method_options={"r": 4},
        task_options={"path": str(data_file), "text_columns": ["review"], "label_column": "sentiment"},
        max_steps=6, eval_every=3, batch_size=8, lr=5e-3, seed=3, progress=False, log_every=1, report_to=report_to))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def curve(records: list[dict], key: str) -> list[tuple[int, float]]:
    if key.startswith("eval/"):
        return [(r["step"], r["eval"][key[5:]]) for r in records if "eval" in r]
    return [(r["step"], r[key]) for r in records if key in r]


def test_tensorboard_and_mlflow_hold_the_curves_of_metrics_jsonl(tiny_model_dir, sentiment_csv, tmp_path,
                                                                  monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    store = (tmp_path / "mlruns").as_uri()  # a local file store (file://...)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    out = tmp_path / "run"
    records = tracked_run(tiny_model_dir, sentiment_csv, out, ["tensorboard", "mlflow"])
    assert len(curve(records, "loss")) == 6 and [s for s, _ in curve(records, "eval/accuracy")] == [3, 6]

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for key in ("loss", "lr", "eval/accuracy", "eval/macro_f1"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert logged == [(s, pytest.approx(v, rel=1e-6)) for s, v in curve(records, key)], key  # float32 there

    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("deltatune").experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    for key in ("loss", "lr", "eval/accuracy"):
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert logged == curve(records, key), key
    params = run.data.params
    assert params["method_options.r"] == "4" and params["seed"] == "3" and params["report_to"] == str(
        ["tensorboard", "mlflow"])
    artifacts = client.download_artifacts(run.info.run_id, "delta", str(tmp_path / "downloaded"))
    for name in ("delta.safetensors", "delta.json"):
        assert (tmp_path / "downloaded" / "delta" / name).read_bytes() == (out / "delta" / name).read_bytes(), artifacts


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_offline_run_holds_the_metrics_config_and_delta(tiny_model_dir, sentiment_csv, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    tracked_run(tiny_model_dir, sentiment_csv, out, ["wandb"])
    (log,) = (out / "wandb").glob("offline-run-*/run-*.wandb")  # read by `wandb sync`; its records, as bytes here
    written = log.read_bytes()
    for expected in (b"eval/accuracy", b"examples_per_s", b"method_options.r", b"csv-delta", b"delta.safetensors"):
        assert expected in written, expected


def test_unknown_or_missing_trackers_are_refused_with_the_fix(monkeypatch):
    with pytest.raises(TrackerError, match="unknown tracker; choose from tensorboard, mlflow, wandb"):
        trackers.check_trackers(["tensorbord"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(TrackerError, match=r"pip install mlflow-skinny==3\.18\.0"):
        trackers.check_trackers(["tensorboard", "mlflow"])
    assert trackers.check_trackers(["tensorboard", " tensorboard"]) == ["tensorboard"]


def test_compare_hands_the_trackers_to_every_cell(tmp_path, monkeypatch):
    from deltatune.results.compare import CompareConfig, plan_cells

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # unset, and restored afterwards
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    config = CompareConfig(task="sst2", methods=["lora", "bitfit"], seeds=2, out=str(tmp_path / "cmp"),
                           report_to=["tensorboard", "mlflow"])
    cells = plan_cells(config)
    assert len(cells) == 4 and all(cell.config.report_to == ["tensorboard", "mlflow"] for cell in cells)
    trackers.share_mlflow_store(config.report_to, tmp_path / "cmp")  # what compare() does before the cells
    assert trackers.os.environ["MLFLOW_TRACKING_URI"] == (tmp_path / "cmp" / "mlruns").resolve().as_uri()
