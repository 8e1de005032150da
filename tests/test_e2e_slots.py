"""E2E slot error rate (tasks/e2e_slots.py): hand-written MR/sentence cases with their counts worked out by hand."""

import pytest

from deltatune.tasks import get_task
from deltatune.tasks.e2e_slots import parse_mr, slot_error_rate, slot_errors

FULL_MR = ("name[The Eagle], eatType[coffee shop], food[Japanese], priceRange[less than £20], "
           "customer rating[low], area[riverside], familyFriendly[yes], near[Burger King]")


def counts(mr: str, text: str) -> tuple[list[str], list[str], list[str]]:
    errors = slot_errors(mr, text)
    return sorted(errors.missing), sorted(errors.wrong), sorted(errors.added)


def test_parse_mr():
    assert parse_mr("name[Aromi], customer rating[5 out of 5], priceRange[£20-25]") == {
        "name": "Aromi", "customer rating": "5 out of 5", "priceRange": "£20-25"}


@pytest.mark.parametrize("text", [
    "The Eagle is a low rated Japanese coffee shop near Burger King by the river. It is kid friendly and costs "
    "less than £20.",
    "Near Burger King in the riverside area, The Eagle coffee shop serves Japanese food for under £20; children "
    "are welcome, though its customer rating is low.",
])
def test_a_sentence_with_every_slot_right_has_no_error(text):
    assert counts(FULL_MR, text) == ([], [], [])
    assert slot_errors(FULL_MR, text).slots == 8


def test_missing_wrong_and_added_counted_by_hand():
    # name, eatType, food, area: food missing, area wrong (city centre for riverside), priceRange added
    mr = "name[Aromi], eatType[pub], food[Indian], area[riverside]"
    assert counts(mr, "Aromi is a cheap pub in the city centre.") == (["food"], ["area"], ["priceRange"])
    # the venue names are verbatim: another E2E name in place of the MR's is a wrong name
    assert counts(mr, "Zizzi is an Indian pub by the river.") == ([], ["name"], [])
    # the MR's value said beside another value of the slot: not an error, counted as contradicted
    contradicting = slot_errors(mr, "Aromi is an Indian pub by the river. It is a coffee shop.")
    assert (contradicting.errors, contradicting.contradicted) == (0, ["eatType"])


def test_negated_family_friendly_is_no_and_not_also_yes():
    yes = "name[Cotto], familyFriendly[yes]"
    no = "name[Cotto], familyFriendly[no]"
    for text in ["Cotto is not family friendly.", "Cotto isn't a kid-friendly place.", "Cotto is adults only.",
                 "Cotto does not allow children.", "Cotto is a non family-friendly venue."]:
        assert counts(no, text) == ([], [], []), text
        assert counts(yes, text) == ([], ["familyFriendly"], []), text
    assert counts(yes, "Cotto is family-friendly.") == ([], [], [])
    assert counts(no, "Cotto is family-friendly.") == ([], ["familyFriendly"], [])
    # a negation of another slot, then "and", is not a negation of the family
    assert counts(yes, "Cotto is not expensive and is kid friendly.") == ([], [], ["priceRange"])


def test_rating_and_price_share_words_but_not_slots():
    mr = "name[The Mill], priceRange[high], customer rating[low]"
    assert counts(mr, "The Mill is a high priced place with a low customer rating.") == ([], [], [])
    assert counts(mr, "The Mill has a high customer rating and low prices.") == (
        [], ["customer rating", "priceRange"], [])
    assert counts("name[The Mill], customer rating[3 out of 5]", "The Mill is rated 3 out of 5.") == ([], [], [])
    assert counts("name[The Mill], customer rating[3 out of 5]", "The Mill is rated 5 out of 5.") == (
        [], ["customer rating"], [])
    assert counts("name[The Mill], priceRange[£20-25]", "The Mill costs £20-25 and has 5 stars.") == (
        [], [], ["customer rating"])


def test_venue_names_are_blanked_before_the_other_slots():
    # "Café Rouge" is a near, not a coffee shop; "Raja Indian Cuisine" is a near, not Indian food
    mr = "name[The Punter], eatType[pub], near[Café Rouge]"
    assert counts(mr, "The Punter is a pub near Café Rouge.") == ([], [], [])
    mr = "name[The Punter], food[English], near[Raja Indian Cuisine]"
    assert counts(mr, "The Punter serves English food near Raja Indian Cuisine.") == ([], [], [])
    assert counts(mr, "The Punter serves English food.") == (["near"], [], [])


def test_corpus_ser_sums_errors_over_slots():
    sources = ["name[Aromi], eatType[pub], food[Indian], area[riverside]",  # 4 slots, 3 errors (as above)
               "name[Cotto], familyFriendly[yes]",  # 2 slots, 1 wrong
               FULL_MR]  # 8 slots, 1 missing (no price)
    texts = ["Aromi is a cheap pub in the city centre.", "Cotto is not family friendly.",
             "The Eagle is a low rated Japanese coffee shop near Burger King by the river. It is kid friendly."]
    assert slot_error_rate(sources, texts) == {"ser": 5 / 14, "missing": 2.0, "wrong": 2.0, "added": 1.0,
                                               "slots": 14.0, "contradicted": 0.0}


def test_ser_is_an_e2e_metric_scored_against_the_sources():
    task = get_task("e2e")
    assert "ser" in task.metric_names
    sources = ["name[Aromi], eatType[pub]", "name[Cotto], familyFriendly[no]"]
    predictions = ["Aromi is a pub.", "Cotto is kid friendly."]
    references = [["Aromi is a pub."], ["Cotto is for adults."]]
    scores = task.compute_metrics(predictions, references, metrics=["bleu", "ser"], sources=sources)
    assert scores["ser"] == 1 / 4
    with pytest.raises(ValueError, match="meaning representation"):
        task.compute_metrics(predictions, references, metrics=["ser"])


def test_a_rejected_answer_has_exactly_the_swapped_slot_wrong():
    import random

    from deltatune.tasks.e2e_pairs import preference_pairs, rejected_with_one_wrong_slot, swapped_value

    mr = "name[Cotto], eatType[pub], food[Italian], familyFriendly[yes]"
    reference = "Cotto is an Italian pub. It is kid friendly."
    seen = set()
    for seed in range(40):
        rejected, swap = rejected_with_one_wrong_slot(mr, reference, random.Random(seed))
        slot = swap.split(":")[0]
        seen.add(slot)
        errors = slot_errors(mr, rejected)
        assert (errors.wrong, errors.missing, errors.added) == ([slot], [], []), (swap, rejected)
    assert seen == {"name", "eatType", "food", "familyFriendly"}  # every slot gets drawn
    # the article follows the new word; a familyFriendly swap adds or drops the negation
    italian = (reference.index("Italian"), reference.index(" pub"))
    chinese = swapped_value(reference, [italian], "food", "Italian", "Chinese")
    assert chinese == "Cotto is a Chinese pub. It is kid friendly."
    negated = "Cotto isn't kid friendly."
    spans = [(negated.index("n't"), negated.index("."))]
    assert swapped_value(negated, spans, "familyFriendly", "no", "yes") == "Cotto is kid friendly."
    # a reference with a slot error of its own gives no pair (here: food missing)
    assert rejected_with_one_wrong_slot(mr, "Cotto is a pub for kids.", random.Random(0)) is None
    rows = preference_pairs([{"source": mr, "target": reference}] * 5, 3, seed=0)
    assert len(rows) == 3 and all(r["prompt"] == mr + "\nSentence:" and r["chosen"] == " " + reference for r in rows)
