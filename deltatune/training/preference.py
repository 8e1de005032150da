"""Preference tuning of a delta: DPO (Rafailov et al. 2023) and SimPO (Meng et al. 2024) in the training loop.

DPO, eq. 7 of Rafailov et al. 2023, for a prompt x with a chosen answer y_w and a rejected one y_l:

    L = -log sigmoid( beta * [ (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)) ] )

with log pi(y|x) the sum of the answer tokens' log-probabilities (`lm_loss.target_log_probs`). The reference
pi_ref is the frozen base (the delta off), or a delta (`--reference DELTA`, e.g. the SFT delta; the policy then
starts as a copy of it, so every margin starts at 0).

**One forward pass for the policy and the reference.** The base weights are shared by both: a mixed batch
(`DeltaModel.forward(tasks=...)`) runs the pairs' 2n sequences twice over, the first 2n rows under the trained
task and the last 2n under the reference ("base" = no delta), in the same pass; the reference rows' log-probs
are detached. Where a method cannot mix (full fine-tuning, whose delta *is* the weights: registry `mixable`),
the reference is a second forward, without gradients, after `use(reference)`; `one_pass=False` forces that
path for every method (what `benchmarks/dpo_step.py` compares), and is what `--reference-pass auto` (the
default) picks on a CPU, where it is the faster step (`resolve_reference_pass`).

SimPO (Meng et al. 2024, eq. 6) needs no reference: the margin of the length-normalised log-probabilities,
``-log sigmoid(beta * (log pi(y_w|x)/|y_w| - log pi(y_l|x)/|y_l|) - gamma)``, on the same data path.

Logged as TRL's DPOTrainer logs them: loss, rewards/chosen, rewards/rejected (beta * the log-ratio to the
reference; SimPO: beta * the mean log-probability), rewards/margins, rewards/accuracies (margin > 0),
logps/chosen, logps/rejected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from deltatune.core.component import BASE_TASK
from deltatune.errors import TrainingError
from deltatune.methods.registry import method_entry
from deltatune.tasks.encoding import Encoded, collate
from deltatune.tasks.preference import EncodedPair

OBJECTIVES = ("sft", "dpo", "simpo")
REFERENCE_TASK = "reference"  # the task name a --reference delta is loaded under
REFERENCE_PASSES = ("auto", "same", "second")


def resolve_reference_pass(option: str, cuda: bool | None = None) -> str:
    """--reference-pass auto -> "second" on a CPU, "same" on CUDA (`cuda`: default, whether CUDA is available).

    Why a second pass wins on a CPU: the step is bound by arithmetic, and the one pass runs the reference rows
    with autograd (their activations kept, the backward pass over all 4n rows: the frozen base's matmuls still
    produce input gradients for every row), where the second pass runs them under no_grad, forward only: about
    2 x (fwd + bwd) against (fwd + bwd) + fwd, measured 1.6x (docs/results/dpo_e2e.md). On a GPU at small batch a
    step is bound by kernel launches and weight reads, which one pass does once for both: "same" there is a
    hypothesis, not measured (no GPU was available to the task that set this default)."""
    if option not in REFERENCE_PASSES:
        raise TrainingError(f"--reference-pass {option!r}: choose one of {list(REFERENCE_PASSES)}")
    if option != "auto":
        return option
    return "same" if (torch.cuda.is_available() if cuda is None else cuda) else "second"


def task_options(objective: str, options: dict[str, Any]) -> dict[str, Any]:
    """A preference objective reads its --data-file as a preference file (`tasks.preference`)."""
    if objective == "sft":
        return options
    if "path" not in options:
        raise TrainingError(f"--objective {objective} trains on a preference file: --task jsonl --data-file "
                            f"PAIRS.jsonl (rows {{\"prompt\", \"chosen\", \"rejected\"}} or chosen/rejected messages)")
    return {**options, "preference": True}


def prepare_policy(model, policy: str, reference: str | None, method: str) -> str | None:
    """With a reference delta: the policy task becomes a copy of it (loaded twice: the trained `policy` task
    and the frozen `REFERENCE_TASK`) and stays active. Returns the reference task (None: the base)."""
    if reference is None:
        return None
    info = dict(model.task_info[policy])
    model.remove_task(policy)
    model.add_delta(reference, task=policy)
    model.add_delta(reference, task=REFERENCE_TASK)
    loaded = model.task_info[policy]["method"]
    if loaded != method:
        raise TrainingError(f"--reference {reference} is a {loaded} delta and --method is {method}: the policy starts "
                            f"as a copy of the reference, so pass --method {loaded}")
    if "prompt_format" in info:
        model.task_info[policy]["prompt_format"] = info["prompt_format"]
    model.use(policy)  # the policy trains; the reference's parameters stay frozen
    return REFERENCE_TASK


@dataclass
class PreferenceObjective:
    """The loss of a batch of encoded pairs (`EncodedPair`) under `model` (a DeltaModel, possibly DDP-wrapped)."""

    objective: str  # "dpo" or "simpo"
    beta: float
    policy: str  # the trained task
    reference: str | None = None  # DPO's reference task; None: the base with the delta off
    one_pass: bool = True  # policy and reference rows in one mixed forward where the method can mix
    simpo_gamma: float = 0.5
    logged: dict[str, float] = field(default_factory=dict)  # the last batch's metrics, for metrics.jsonl

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES[1:]:
            raise TrainingError(f"objective {self.objective!r}: choose one of {list(OBJECTIVES)}")
        if not self.beta > 0:
            raise TrainingError(f"--beta must be > 0 (the strength of the preference), not {self.beta}")

    def mixes(self, model) -> bool:
        """Whether the policy's and the reference's rows can share one forward (the registry's `mixable`)."""
        methods = {model.task_info[t]["method"] for t in (self.policy, self.reference) if t is not None}
        return self.one_pass and all(method_entry(m).mixable for m in methods)

    def loss(self, model, delta_model, pairs: list[EncodedPair], pad_id: int, device) -> torch.Tensor:
        """The mean loss over `pairs`; their metrics (detached) go to `self.logged`."""
        items = [Encoded(pair.chosen[0], None, pair.chosen[1]) for pair in pairs]
        items += [Encoded(pair.rejected[0], None, pair.rejected[1]) for pair in pairs]
        batch = {k: v.to(device) for k, v in collate(items, pad_id).items()}
        labels = batch.pop("labels")
        n = len(pairs)
        if self.objective == "simpo":
            sums, counts = model(**batch, target_labels=labels, target_sums=True)
            averages = sums / counts.clamp(min=1)
            logits = self.beta * (averages[:n] - averages[n:]) - self.simpo_gamma
            rewards = self.beta * averages.detach()
        else:
            sums, reference = self.log_probs(model, delta_model, batch, labels)
            ratios = sums - reference  # log pi(y|x) - log pi_ref(y|x), per sequence
            logits = self.beta * (ratios[:n] - ratios[n:])  # Rafailov et al. 2023, eq. 7
            rewards = self.beta * ratios.detach()
        loss = -F.logsigmoid(logits).mean()
        chosen, rejected = rewards[:n], rewards[n:]
        self.logged = {"rewards/chosen": chosen.mean().item(), "rewards/rejected": rejected.mean().item(),
                       "rewards/margins": (chosen - rejected).mean().item(),
                       "rewards/accuracies": (chosen > rejected).float().mean().item(),
                       "logps/chosen": sums[:n].detach().mean().item(),
                       "logps/rejected": sums[n:].detach().mean().item()}
        return loss

    def log_probs(self, model, delta_model, batch: dict, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the policy's summed answer log-probs, the reference's, detached), both (2n,)."""
        rows = labels.shape[0]
        reference = self.reference or BASE_TASK
        if self.mixes(delta_model):  # one forward: rows 0..2n-1 under the policy, 2n..4n-1 under the reference
            doubled = {k: torch.cat([v, v]) for k, v in batch.items()}
            sums, _ = model(**doubled, tasks=[self.policy] * rows + [reference] * rows,
                            target_labels=torch.cat([labels, labels]), target_sums=True)
            return sums[:rows], sums[rows:].detach()
        sums, _ = model(**batch, target_labels=labels, target_sums=True)  # the active task: the policy
        with torch.no_grad():
            delta_model.use(reference)  # full fine-tuning: its weights are swapped out, then back in
            try:
                reference_sums, _ = model(**batch, target_labels=labels, target_sums=True)
            finally:
                delta_model.use(self.policy)
        return sums, reference_sums

    @torch.no_grad()
    def evaluate(self, model, delta_model, pairs: list[EncodedPair], pad_id: int, device,
                 batch_size: int) -> dict[str, float]:
        """The metrics over the dev pairs (means weighted by batch size), the loss included."""
        was_training = delta_model.training
        delta_model.eval()
        totals: dict[str, float] = {}
        try:
            for start in range(0, len(pairs), batch_size):
                chunk = pairs[start : start + batch_size]
                loss = self.loss(model, delta_model, chunk, pad_id, device).item()
                for key, value in {**self.logged, "loss": loss}.items():
                    totals[key] = totals.get(key, 0.0) + value * len(chunk)
        finally:
            delta_model.train(was_training)
        return {key: value / max(1, len(pairs)) for key, value in totals.items()}
