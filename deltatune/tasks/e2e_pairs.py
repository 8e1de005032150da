"""E2E preference pairs for DPO (benchmarks/dpo_e2e.py): a human reference, and the same reference with one slot wrong.

The rejected answer swaps one slot value the reference realises for another value of the same slot (a familyFriendly
yes/no by adding or dropping the negation), and is kept only where the slot checker (`e2e_slots`, after Dušek et al.
2020) finds exactly that slot wrong in it and no error in the reference: a fluent sentence that gets one slot wrong,
the error the issue's faithfulness measurement counts.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from deltatune.tasks.e2e_slots import PATTERNS, VENUES, parse_mr, realisations, slot_errors
from deltatune.tasks.generation import generation_prompt

# A value is swapped only for another of its group, so that the sentence stays grammatical ("rated 1 out of 5" ->
# "rated 5 out of 5", "a cheap pub" -> "a moderate pub"; not "rated cheap").
SWAP_GROUPS = [("1 out of 5", "3 out of 5", "5 out of 5"), ("low", "average", "high"),
               ("less than £20", "£20-25", "more than £30"), ("cheap", "moderate", "high"),
               ("city centre", "riverside"), ("coffee shop", "pub", "restaurant"),
               ("Chinese", "English", "Fast food", "French", "Indian", "Italian", "Japanese")]
STRIPPED_NEGATION = re.compile(r"^(?:n't|(?:not|non|no|never)[- ])", re.IGNORECASE)  # "isn't kid" -> "is kid"


def swap_candidates(slot: str, value: str) -> list[str]:
    """The values `value` of `slot` may be swapped for."""
    if slot in VENUES:
        return [venue for venue in VENUES[slot] if venue != value]
    if slot == "familyFriendly":
        return ["no" if value == "yes" else "yes"]
    group = next((g for g in SWAP_GROUPS if value in g and all(v in dict(PATTERNS[slot]) for v in g)), ())
    return [other for other in group if other != value]


def replace_spans(text: str, spans: list[tuple[int, int]], rewrite) -> str | None:
    """`text` with each span rewritten by `rewrite(span text, text before it)` (None: cannot), right to left."""
    for start, end in sorted(spans, reverse=True):
        new = rewrite(text[start:end], text[:start])
        if new is None:
            return None
        text = text[:start] + new + text[end:]
    return text


def swapped_value(text: str, spans: list[tuple[int, int]], slot: str, value: str, other: str) -> str | None:
    """`text` with the realisations of `slot`=`value` (at `spans`) turned into `other`, or None where a
    realisation does not say the value in words that can be swapped ("highly rated" for high: left alone)."""
    if slot == "familyFriendly":  # yes -> "not family friendly"; no -> the negation dropped ("isn't" -> "is")
        if other == "no":
            return replace_spans(text, spans, lambda span, before: "not " + span)
        return replace_spans(text, spans, lambda span, before: STRIPPED_NEGATION.sub("", span)
                             if STRIPPED_NEGATION.match(span) else None)

    def rewrite(span: str, before: str) -> str | None:
        at = span.lower().find(value.lower())
        if at < 0:
            return None
        word = other if slot in VENUES or slot == "food" else other.lower()
        return span[:at] + word + span[at + len(value):]

    swapped = replace_spans(text, spans, rewrite)
    if swapped is None:
        return None
    # the article before the new word: "an Italian" -> "a Chinese", "a coffee shop" -> "an English ..."
    return re.sub(r"\b([Aa])n? (?=(\w))", lambda m: m.group(1) + ("n " if m.group(2).lower() in "aeiou" else " "),
                  swapped)


def rejected_with_one_wrong_slot(mr: str, reference: str, rng) -> tuple[str, str] | None:
    """(the reference with one slot value swapped for another value of that slot, "slot: value -> other"), the
    slot, then the value, drawn with `rng` (a `random.Random`) among those the reference realises; None when
    the reference has a slot error itself or no slot can be swapped so that exactly that slot is wrong."""
    slots = parse_mr(mr)
    if slot_errors(slots, reference).errors:
        return None
    found = realisations(reference, slots)
    swappable = [slot for slot, value in slots.items() if set(found.get(slot, {})) == {value}]
    for slot in rng.sample(swappable, len(swappable)):  # each slot as likely (name has 28 others, area 1)
        value = slots[slot]
        others = swap_candidates(slot, value)
        for other in rng.sample(others, len(others)):
            rejected = swapped_value(reference, found[slot][value], slot, value, other)
            if rejected is None or rejected == reference:
                continue
            errors = slot_errors(slots, rejected)
            if errors.wrong == [slot] and not errors.missing and not errors.added:
                return rejected, f"{slot}: {value} -> {other}"
    return None


def preference_pairs(examples: Sequence[dict], count: int, seed: int) -> list[dict]:
    """Up to `count` preference rows from E2E training examples (``{"source", "target"}``), in a seeded order:
    prompt = the E2E prompt (`generation_prompt`, what `--task e2e` trains on), chosen = " " + the reference,
    rejected = " " + that reference with one slot wrong (`rejected_with_one_wrong_slot`); references with a slot
    error of their own, or none that can be swapped, are passed over. Each row also says which MR and swap."""
    rng, pairs = random.Random(seed), []
    for example in rng.sample(list(examples), len(examples)):
        swapped = rejected_with_one_wrong_slot(example["source"], example["target"], rng)
        if swapped is not None:
            pairs.append({"prompt": generation_prompt(example["source"]), "chosen": " " + example["target"],
                          "rejected": " " + swapped[0], "swap": swapped[1], "mr": example["source"]})
            if len(pairs) == count:
                break
    return pairs
