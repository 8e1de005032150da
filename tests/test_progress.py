"""The progress display of train and compare off a terminal, and compare's scheduling of its cells."""

from __future__ import annotations

import io
import json
import signal
from dataclasses import asdict
from pathlib import Path

from deltatune.results import compare as compare_module
from deltatune.results.compare import CompareConfig, RunningCell, plan_cells, run_cells
from deltatune.results.report import _budgets
from deltatune.training.loop import TrainConfig, train
from deltatune.training.progress import ProgressDisplay


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_at_most_every_interval_with_eta():
    clock, stream = Clock(), io.StringIO()
    display = ProgressDisplay("step", 10, stream=stream, every=30, clock=clock)
    assert display.bar is None  # a StringIO is not a terminal
    for now, step in [(10, 2), (20, 3), (40, 5), (50, 10)]:
        clock.now = now
        display.update(step, "loss 1.0")
    display.close()
    # 2 of 10 steps in 10 s: 40 s left; at 40 s, 5 of 10: 40 s left; 3 at 20 s is within 30 s of the last line
    assert stream.getvalue().splitlines() == [
        "step 2/10 loss 1.0 | 0:10 elapsed, ETA 0:40",
        "step 5/10 loss 1.0 | 0:40 elapsed, ETA 0:40",
        "step 10/10 loss 1.0 | 0:50 elapsed, ETA 0:00",
    ]


def test_train_prints_plain_progress_when_stdout_is_not_a_terminal(tiny_model_dir, sentiment_csv, tmp_path, capsys):
    train(TrainConfig(model=str(tiny_model_dir), task="csv", method="lora", out=str(tmp_path / "run"), max_steps=3,
                      batch_size=8, task_options={"path": str(sentiment_csv), "text_columns": ["review"],
                                                  "label_column": "sentiment"}))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert lines[0].startswith("step 1/3 loss ") and lines[-1].startswith("step 3/3 loss "), lines
    assert lines[-1].endswith("ETA 0:00")


class FakeProcess:
    """A cell's subprocess that ends after `polls` polls and records the signals it gets."""

    def __init__(self, polls: int, signals: list, name: str):
        self.polls, self.signals, self.name, self.returncode = polls, signals, name, None

    def poll(self):
        self.polls -= 1
        if self.polls <= 0:
            self.returncode = 0
        return self.returncode

    def send_signal(self, number):
        self.signals.append((self.name, number))


def test_cells_start_longest_first_and_an_idle_core_goes_to_a_running_cell(tmp_path, monkeypatch):
    config = CompareConfig(model="m", task="bbc-headlines", methods=["lora", "prompt", "bitfit"], budget="steps=100",
                           out=str(tmp_path), latency=False)
    cells = plan_cells(config)
    polls = {"prompt": 6, "lora": 2, "bitfit": 2}
    started, signals = [], []

    def start(cell, logs, threads):
        started.append((cell.config.method, threads))
        Path(cell.config.out).mkdir(parents=True)
        (Path(cell.config.out) / "metrics.jsonl").write_text(json.dumps({"step": 10, "seconds": 1.0}) + "\n")
        return RunningCell(cell, FakeProcess(polls[cell.config.method], signals, cell.name), None, Path(), 0.0,
                           threads)

    def finish(running, cell_file):
        return {"config": {}, "wall_seconds": 1.0, "summary": {"steps": 100, "final": {"accuracy": 0.5}}}

    monkeypatch.setattr(compare_module, "available_cores", lambda: 2)
    monkeypatch.setattr(compare_module, "start_cell", start)
    monkeypatch.setattr(compare_module, "finish_cell", finish)
    monkeypatch.setattr(compare_module, "POLL_SECONDS", 0)
    monkeypatch.setattr(compare_module.torch.cuda, "is_available", lambda: False)
    results = run_cells(config, cells)
    # prompt tuning (20 virtual tokens) is the longest: it starts first; two single-thread cells on 2 cores
    assert started == [("prompt", 1), ("lora", 1), ("bitfit", 1)]
    # bitfit ends while prompt still runs and nothing is left to start: its core goes to prompt
    assert signals == [("prompt-seed0", signal.SIGUSR1)]
    assert list(results) == ["lora-seed0", "prompt-seed0", "bitfit-seed0"]  # the planned order


def test_budget_auto_shares_a_whole_comparison_time_limit_over_the_cores(monkeypatch):
    monkeypatch.setattr(compare_module, "available_cores", lambda: 2)
    monkeypatch.setattr(compare_module.torch.cuda, "is_available", lambda: False)
    cells = plan_cells(CompareConfig(task="bbc-headlines"))  # the 9 registered methods
    assert len(cells) == 9
    # 300 s for the whole comparison, two cells at a time: 300 x 2 / 9 = 66.7 s each, or 100 steps
    assert {(c.config.max_steps, c.config.max_seconds, c.config.max_length) for c in cells} == {(100, 66.7, 24)}
    explicit = plan_cells(CompareConfig(task="bbc-headlines", budget="steps=50"))
    assert {(c.config.max_steps, c.config.max_seconds) for c in explicit} == {(50, None)}
    sst2 = plan_cells(CompareConfig(task="sst2"))
    assert {c.config.max_seconds for c in sst2} == {None}
    results = {cell.name: {"config": asdict(cell.config), "summary": {"steps": 61 if cell.label == "prompt" else 100}}
               for cell in cells}
    assert _budgets(results) == ("100 steps or 66.7 s of training, whichever came first (the time came first: "
                                 "prompt-seed0 at 61 steps), max length 24")
