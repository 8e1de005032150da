"""The causal-LM loss computed on the positions that carry loss only.

A decoder's output layer maps every position's hidden state to the whole vocabulary (SmolLM2: 576 ->
49,152, about a fifth of the model's forward work per token), and the cross-entropy then normalises
each of those rows. Positions whose next token is not a target (prompts, user turns, padding) are
thrown away by the loss anyway. So the hidden states of the target positions are gathered first and
only they go through the LM head and the cross-entropy:

    hidden (B, L, d) -> hidden[:, :-1][labels[:, 1:] != -100]  (N, d) -> lm_head -> (N, V) -> CE

The loss and every gradient equal the full computation's (the same mean over the same N targets);
only the N x V logits are ever made, not B x L x V.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # labels the loss skips (as deltatune.tasks.encoding)
# config attributes of models whose logits are not just lm_head(hidden): those get the full computation
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def splits_head(model) -> bool:
    """Whether `model`'s logits are `lm_head(body(...)[0])`, so the body and the head can run apart."""
    config = getattr(model, "config", None)
    if any(getattr(config, name, None) for name in LOGIT_TRANSFORMS):
        return False
    body = getattr(model, "base_model", None)
    return body is not None and body is not model and model.get_output_embeddings() is not None


def target_only_loss(model, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting ``labels[:, t + 1]`` at position t, over the labels that are not
    -100, with the LM head run on those positions only. `inputs` are the forward keyword arguments of a
    transformers causal LM (`model`); `labels` are aligned with them (B, L)."""
    if not splits_head(model):  # a model that changes its logits after the head: the plain computation
        logits = model(**inputs).logits[:, :-1]
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    hidden = model.base_model(**inputs).last_hidden_state  # (B, L, d)
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX  # (B, L - 1)
    selected = hidden[:, :-1][keep]  # (N, d): the positions whose next token is a target
    if selected.shape[0] == 0:  # no target at all: a zero loss that still reaches the parameters
        return hidden.sum() * 0.0
    logits = model.get_output_embeddings()(selected)  # (N, V)
    return F.cross_entropy(logits.float(), targets[keep])


def target_log_probs(model, inputs: dict, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) summed log-probabilities of each row's target tokens (``labels[:, t + 1]`` at position t, where
    not -100) and (B,) their counts: log pi(y | x) of a response, what preference losses compare (Rafailov
    et al. 2023, eq. 7). The LM head runs on the target positions only, as in `target_only_loss`."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX  # (B, L - 1)
    counts = keep.sum(dim=1)
    if not splits_head(model):
        logits = model(**inputs).logits[:, :-1].float()  # (B, L - 1, V)
        picked = torch.gather(logits.log_softmax(-1), 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (picked * keep).sum(dim=1), counts
    hidden = model.base_model(**inputs).last_hidden_state  # (B, L, d)
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])  # (N, V)
    token_log_probs = -F.cross_entropy(logits.float(), targets[keep], reduction="none")  # (N,)
    rows = keep.nonzero()[:, 0]  # the row of each of the N targets
    sums = torch.zeros(labels.shape[0], dtype=token_log_probs.dtype, device=labels.device)
    return sums.index_add(0, rows, token_log_probs), counts
