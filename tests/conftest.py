"""Shared fixtures: tiny random models of every architecture, inputs that suit them, real data paths."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from deltatune.testing import tiny_model, tiny_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Fuzzing: 150 examples per property test by default; HYPOTHESIS_PROFILE=thorough for 1,000 each.
settings.register_profile("default", max_examples=150)
settings.register_profile("thorough", max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
# tiny models run much faster on one thread (and do not suffer when the machine is busy)
torch.set_num_threads(1)

ARCHS = ["bert", "roberta", "gpt2", "llama", "t5"]

# ---- real data (GLUE, E2E as published) -----------------------------------------------------------------------
# Found in $DELTATUNE_DATA, else in ../shared/data beside the checkout. Read once, here, before any test's
# fixture removes $DELTATUNE_DATA to keep the code under test from seeing it. Without the data the tests that
# need it are skipped, each by name with the folders looked in (the `-ra` summary lists them); under
# DELTATUNE_REQUIRE_DATA=1 (set by .ci/run) they fail instead, so CI cannot pass by skipping them.
DATA_ENV, REQUIRE_DATA_ENV = "DELTATUNE_DATA", "DELTATUNE_REQUIRE_DATA"
BESIDE_CHECKOUT = Path(__file__).resolve().parents[2] / "shared" / "data"
DATA_LAYOUT = ("glue", "e2e")  # the published folders the real-data tests read


def _find_real_data() -> tuple[Path | None, str]:
    """The data folder (None when absent) and where it was looked for."""
    given = os.environ.get(DATA_ENV)
    folder = Path(given).expanduser() if given else BESIDE_CHECKOUT
    where = f"${DATA_ENV}={given}" if given else f"{BESIDE_CHECKOUT} (${DATA_ENV} unset)"
    if all((folder / part).is_dir() for part in DATA_LAYOUT):
        return folder.resolve(), f"from ${DATA_ENV}" if given else f"beside the checkout, ${DATA_ENV} unset"
    return None, f"no {' and '.join(part + '/' for part in DATA_LAYOUT)} in {where}"


REAL_DATA, REAL_DATA_LOOKED = _find_real_data()
REQUIRE_DATA = os.environ.get(REQUIRE_DATA_ENV, "") not in ("", "0")


def real_data(request: pytest.FixtureRequest) -> Path:
    """The real data folder for the requesting test, else skip it by name (fail it under the strict switch)."""
    if REAL_DATA is not None:
        return REAL_DATA
    message = f"{request.node.nodeid} needs the real data: {REAL_DATA_LOOKED} (set {DATA_ENV})"
    if REQUIRE_DATA:
        pytest.fail(f"{REQUIRE_DATA_ENV}=1 and {message}", pytrace=False)
    pytest.skip(message)


def make_model(arch: str, seed: int = 0, kind: str = "classification"):
    """The same tiny random model for the same (arch, seed): a 'fresh copy of the base'."""
    torch.manual_seed(seed)
    return tiny_model(arch, kind)


def make_inputs(arch: str, batch: int = 3, length: int = 9, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, 500, (batch, length), generator=generator)
    input_ids[:, -1] = 1  # T5 classification reads the (single) </s>; harmless elsewhere
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


DATA_TESTS: set[str] = set()  # node ids of the collected tests that take `data_dir`


def pytest_collection_modifyitems(items) -> None:
    DATA_TESTS.update(item.nodeid for item in items if "data_dir" in getattr(item, "fixturenames", ()))


def pytest_terminal_summary(terminalreporter) -> None:
    """One line under the results: where the real data came from and what became of the tests that need it."""
    outcomes = {key: {r.nodeid for r in terminalreporter.stats.get(key, []) if r.nodeid in DATA_TESTS}
                for key in ("passed", "failed", "error", "skipped")}
    ran = set().union(*outcomes.values())
    if not ran:
        return
    counts = ", ".join(f"{len(ids)} {key}" for key, ids in outcomes.items() if ids)
    if REAL_DATA is not None:
        terminalreporter.write_line(f"real data: {REAL_DATA} ({REAL_DATA_LOOKED}); tests that need it: {counts}")
    elif REQUIRE_DATA:
        terminalreporter.write_line(f"real data not found ({REAL_DATA_LOOKED}) and {REQUIRE_DATA_ENV} is set: "
                                    f"tests that need it: {counts}", red=True)
    else:
        terminalreporter.write_line(f"real data not found ({REAL_DATA_LOOKED}); tests that need it: {counts} "
                                    f"(each named above; {REQUIRE_DATA_ENV}=1 makes them fail)", yellow=True)


@pytest.fixture
def data_dir(request) -> Path:
    """The real data folder ($DELTATUNE_DATA, else ../shared/data); every real-data test takes it."""
    return real_data(request)


WORDS_POSITIVE = ["great", "charming", "moving", "funny"]
WORDS_NEGATIVE = ["terrible", "bleak", "weak", "desperate"]


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A tiny random BERT classifier and tokenizer saved as a model folder."""
    path = tmp_path / "tiny-bert"
    make_model("bert").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def sentiment_csv(tmp_path):
    """128 short reviews whose label is given by one sentiment word (learnable by a tiny model)."""
    generator = torch.Generator().manual_seed(0)
    path = tmp_path / "reviews.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review", "sentiment"])
        for i in range(128):
            label = i % 2
            words = WORDS_POSITIVE if label else WORDS_NEGATIVE
            word = words[int(torch.randint(len(words), (1,), generator=generator))]
            writer.writerow([f"the movie was {word} .", "positive" if label else "negative"])
    return path
