"""Slot error rate (SER) of E2E outputs: which of the meaning representation's slot values a sentence realises.

In the style of the E2E challenge's slot-error script (Dušek, Novikova & Rieser 2020, "Evaluating the
state-of-the-art of End-to-End Natural Language Generation: The E2E NLG Challenge", Computer Speech & Language
59, §5.2 and the `slot_error.py` of the e2e-cleaning repository): every value of every slot has regular-expression
patterns for its realisations; a sentence realises the values whose patterns match. Per slot of the MR:

- correct: the MR's value is realised;
- wrong: it is not, but another value of the same slot is (``priceRange[cheap]`` written "expensive");
- missing: no value of the slot is realised;

and per slot absent from the MR that the sentence realises anyway: added. SER = (missing + wrong + added) /
the number of MR slots, summed over a corpus (lower is better).

How overlapping patterns are resolved: name and near are matched first, verbatim (case-insensitive), against
the E2E venue names, and blanked out, so that "Café Rouge" (a near) is not a coffee shop and "Raja Indian
Cuisine" not Indian food. Then the slots in `SLOT_ORDER`, each value's patterns in the order written, every match
blanked before the next pattern runs: customer rating before priceRange (both say "high", "low", "average": a
rating pattern needs a rating word beside it), a negated familyFriendly ("not family friendly") before the plain
one, "not expensive" before "expensive". Names are not delexicalised in the E2E data; the venue lists are the
values of the E2E dev and test MRs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

NAMES = ("Alimentum", "Aromi", "Bibimbap House", "Blue Spice", "Browns Cambridge", "Clowns", "Cocum", "Cotto",
         "Fitzbillies", "Giraffe", "Green Man", "Loch Fyne", "Midsummer House", "Strada", "Taste of Cambridge",
         "The Cambridge Blue", "The Cricketers", "The Eagle", "The Golden Palace", "The Mill", "The Phoenix",
         "The Plough", "The Punter", "The Vaults", "The Waterman", "The Wrestlers", "Travellers Rest Beefeater",
         "Wildwood", "Zizzi")
NEAR = ("All Bar One", "Avalon", "Burger King", "Café Brazil", "Café Rouge", "Café Sicilia", "Clare Hall",
        "Crowne Plaza Hotel", "Express by Holiday Inn", "Rainbow Vegetarian Café", "Raja Indian Cuisine", "Ranch",
        "The Bakers", "The Portland Arms", "The Rice Boat", "The Sorrento")


def rated(words: str) -> list[str]:
    """A customer-rating value said with `words` (a regex alternation) beside a rating word, either order:
    "high customer rating", "highly rated", "rating is high", "rated as average"."""
    rating = r"(?:customer |user |consumer )?(?:rat(?:ed|ings?)|reviews?|reviewed|scores?|feedback|regarded)"
    return [rf"\b(?:{words})(?:ly)?[- ]{rating}\b",
            rf"\b{rating}(?: (?:is|are|was|of|as|at|by customers|by diners))*(?: an?)?(?: very)? ['\"]?"
            rf"(?:{words})(?:ly)?\b"]


def stars(digit: str, word: str) -> list[str]:
    """A numeric rating: "3 out of 5", "3/5", "3 stars", "rating of 3", "three-star"."""
    number = rf"(?:{digit}|{word})"
    return [rf"\b{number} ?(?:out of|out|of|/) ?(?:5|five)\b", rf"\b{number}[- ]stars?\b",
            rf"\brat(?:ed|ings?)(?: (?:is|of|at|as))* {number}\b(?! ?(?:out|of|/))"]


NEGATION = r"(?:\bnot|n't|\bno|\bnever|\bnon)"
FAMILY = r"(?:kids?|child(?:ren)?|famil(?:y|ies)|all ages)"
POUNDS = r"(?:£ ?)?"

# slot -> [(value, [patterns, in order])]: all matched case-insensitively, each match blanked before the next
PATTERNS: dict[str, list[tuple[str, list[str]]]] = {
    "familyFriendly": [
        ("no", [rf"{NEGATION}(?:[- ](?!and\b|but\b|or\b|while\b|although\b|though\b)[\w']+){{0,3}}[- ]{FAMILY}",
                rf"\b{FAMILY}[- ]unfriendly\b", r"\badults?[- ]only\b", r"\b(?:only )?for adults\b",
                rf"\bunsuitable for (?:the )?{FAMILY}",
                r"\badult (?:establishment|venue|place|atmosphere|audience|crowd|clientele)\b"]),
        ("yes", [rf"\b{FAMILY}\b"]),
    ],
    "customer rating": [
        ("1 out of 5", stars("1", "one")),
        ("3 out of 5", stars("3", "three")),
        ("5 out of 5", stars("5", "five")),
        ("low", rated(r"low|poor|bad|negative|terrible")),
        ("average", rated(r"average|moderate|mediocre|middling|decent|ok|okay|fair")),
        ("high", rated(r"high|excellent|great|good|top|positive|outstanding|well")),
    ],
    "priceRange": [
        ("less than £20", [rf"\b(?:less|lower|cheaper) than {POUNDS}20\b", rf"\b(?:under|below|beneath) {POUNDS}20\b",
                           rf"{POUNDS}20 (?:or|and) (?:less|under|below)\b", r"\b(?:less than|under) twenty\b"]),
        ("£20-25", [rf"{POUNDS}\b20 ?(?:-|–|to|and) ?{POUNDS}25\b", r"\btwenty (?:to|-) twenty[- ]five\b"]),
        ("more than £30", [rf"\b(?:more|higher|greater|over|above|exceeding)(?: than)? {POUNDS}30\b",
                           rf"{POUNDS}30 (?:or more|and (?:up|over|above)|plus)\b", r"£30\+",
                           r"\b(?:more than|over) thirty\b"]),
        ("cheap", [r"\bnot (?:very |too |that |so )?(?:expensive|pricey|costly)\b", r"\bcheap(?:ly|er|est)?\b",
                   r"\binexpensive(?:ly)?\b", r"\blow[- ](?:cost|priced?|prices?|price range|budget)\b",
                   r"\b(?:price|prices|pricing|price range|costs?)(?: (?:is|are))?(?: very)? low\b", r"\bbudget\b"]),
        ("high", [r"\bnot (?:very |too |that |so )?cheap\b", r"\bexpensive\b", r"\bpricey\b", r"\bcostly\b",
                  r"\bhigh(?:ly)?[- ]?(?:end|class|cost|priced?|prices?|price range)\b", r"\bhigh range\b",
                  r"\bup-?(?:scale|market)\b",
                  r"\b(?:price|prices|pricing|price range|costs?)(?: (?:is|are))?(?: very| quite| rather)? high\b"]),
        ("moderate", [r"\bmoderate(?:ly)?\b", r"\baverage[- ](?:cost|priced?|prices?|price range)\b",
                      r"\b(?:price|prices|pricing|price range|costs?)(?: (?:is|are))?(?: in the)? average\b",
                      r"\b(?:mid|medium)[- ]?(?:ranged?|priced?|prices?)\b", r"\breasonabl[ey]\b",
                      r"\bfair(?:ly)?[- ]priced?\b"]),
    ],
    "area": [
        ("city centre", [r"\b(?:city|town)[- ]?cent(?:re|er)\b", r"\bcent(?:re|er) of (?:the )?(?:city|town)\b",
                         r"\b(?:in|at|near) the cent(?:re|er)\b", r"\bcentral(?:ly)?\b", r"\bdowntown\b"]),
        ("riverside", [r"\briver"]),
    ],
    "eatType": [
        ("coffee shop", [r"\bcoffee[- ]?(?:shop|house)s?\b", r"\bcaf[eé]s?\b"]),
        ("pub", [r"\bpubs?\b"]),
        ("restaurant", [r"\brestaurants?\b"]),
    ],
    "food": [
        ("Chinese", [r"\bchinese\b"]), ("English", [r"\benglish\b", r"\bbritish\b"]),
        ("Fast food", [r"\bfast[- ]?food\b"]), ("French", [r"\bfrench\b"]), ("Indian", [r"\bindian\b"]),
        ("Italian", [r"\bitalian\b"]), ("Japanese", [r"\bjapanese\b", r"\bsushi\b"]),
    ],
}
VENUES = {"name": NAMES, "near": NEAR}
SLOT_ORDER = ("familyFriendly", "customer rating", "priceRange", "area", "eatType", "food")
COMPILED = {slot: [(value, [re.compile(p, re.IGNORECASE) for p in patterns]) for value, patterns in values]
            for slot, values in PATTERNS.items()}
MR_SLOT = re.compile(r"\s*([^\[,]+?)\s*\[([^\]]*)\]")


def parse_mr(mr: str) -> dict[str, str]:
    """"name[Aromi], food[Thai]" -> {"name": "Aromi", "food": "Thai"}."""
    return dict(MR_SLOT.findall(mr))


def realisations(text: str, mr: dict[str, str] | None = None) -> dict[str, dict[str, list[tuple[int, int]]]]:
    """slot -> {value: [(start, end) of each match in `text`]} for every value `text` realises. `mr`'s own
    name/near values are looked for too when they are not among the known venues."""
    found: dict[str, dict[str, list[tuple[int, int]]]] = {}
    blanked = text

    def take(slot: str, value: str, pattern: re.Pattern) -> None:
        nonlocal blanked
        for match in pattern.finditer(blanked):
            found.setdefault(slot, {}).setdefault(value, []).append(match.span())
            blanked = blanked[: match.start()] + " " * (match.end() - match.start()) + blanked[match.end() :]

    for slot, venues in VENUES.items():  # longest first: "The Cambridge Blue" before a shorter name inside it
        extra = [mr[slot]] if mr and mr.get(slot) and mr[slot] not in venues else []
        for venue in sorted({*venues, *extra}, key=len, reverse=True):
            take(slot, venue, re.compile(rf"(?<!\w){re.escape(venue)}(?!\w)", re.IGNORECASE))
    for slot in SLOT_ORDER:
        for value, patterns in COMPILED[slot]:
            for pattern in patterns:
                take(slot, value, pattern)
    return found


@dataclass
class SlotErrors:
    """The slot errors of one sentence against its MR (slot names in each list)."""

    slots: int  # the MR's slots
    missing: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    # correct slots whose sentence also realises another value of the slot ("a pub ... and a coffee shop"): not
    # errors under the rule above (the value is realised), counted apart so that a contradiction is visible
    contradicted: list[str] = field(default_factory=list)

    @property
    def errors(self) -> int:
        return len(self.missing) + len(self.wrong) + len(self.added)


def slot_errors(mr: str | dict[str, str], text: str) -> SlotErrors:
    """Missing, wrong and added slots of `text` against the MR (see the module docstring)."""
    slots = parse_mr(mr) if isinstance(mr, str) else mr
    found = realisations(text, slots)
    checked = {slot: value for slot, value in slots.items() if slot in PATTERNS or slot in VENUES}
    result = SlotErrors(len(checked))  # a slot this checker has no patterns for is not counted at all
    for slot, value in checked.items():
        realised = found.get(slot, {})
        if not realised:
            result.missing.append(slot)
        elif value.lower() not in {v.lower() for v in realised}:
            result.wrong.append(slot)
        elif len(realised) > 1:
            result.contradicted.append(slot)
    result.added = [slot for slot in found if slot not in slots]
    return result


def slot_error_rate(sources: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Corpus SER: {"ser": (missing + wrong + added) / MR slots, "missing", "wrong", "added", "slots": counts,
    "contradicted": correct slots that also realise another value (not in SER)}."""
    if len(sources) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions but {len(sources)} MRs")
    totals = {"missing": 0, "wrong": 0, "added": 0, "slots": 0, "contradicted": 0}
    for source, prediction in zip(sources, predictions, strict=True):
        errors = slot_errors(source, prediction)
        totals["slots"] += errors.slots
        for kind in ("missing", "wrong", "added", "contradicted"):
            totals[kind] += len(getattr(errors, kind))
    ser = (totals["missing"] + totals["wrong"] + totals["added"]) / max(totals["slots"], 1)
    return {"ser": ser, **{k: float(v) for k, v in totals.items()}}

