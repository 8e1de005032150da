"""Deltas saved by deltatune before its modules moved into packages (tests/data/deltas-before-rooms, written by
commit 7078e84 with every registered method on a tiny BERT classifier and a tiny Llama LM, parameters perturbed
away from their init) load after the move and give the logits they gave then: bit for bit on the CPU that wrote
them, to float32 rounding on another (a CPU with AVX-512 rounds the same products differently from one with AVX2
only: at most 3e-7 here, where each delta moves the logits by 1e-3 or more)."""

import pytest
import torch
from safetensors.torch import load_file

import deltatune
from deltatune.testing import tiny_model, tiny_tokenizer

FIXTURE = __import__("pathlib").Path(__file__).parent / "data" / "deltas-before-rooms"
CASES = sorted(p.name for p in FIXTURE.iterdir() if p.is_dir())


def test_every_method_has_a_saved_delta():
    from deltatune.methods.registry import METHODS

    assert {case.split("-", 1)[1] for case in CASES} == set(METHODS)


@pytest.mark.parametrize("case", CASES)
def test_delta_saved_before_the_move_loads_with_the_logits_it_gave(case):
    arch = case.split("-", 1)[0]
    torch.manual_seed(0)
    base = tiny_model(arch, "classification" if arch == "bert" else "causal-lm")
    batch = tiny_tokenizer()(["the movie was great", "a weak plot"], return_tensors="pt", padding=True)
    with torch.no_grad():
        before = base.eval()(**batch).logits
        model = deltatune.load_delta(base, FIXTURE / case).eval()
        logits = model(**batch).logits
    saved = load_file(str(FIXTURE / "logits.safetensors"))[case]
    changed = saved[:, -before.shape[1]:] - before  # the text's positions (prompt tuning's come after its own)
    assert changed.abs().max() > 1e-3  # the delta changes the logits: a delta lost on loading would show
    torch.testing.assert_close(logits, saved, rtol=0, atol=1e-6)
