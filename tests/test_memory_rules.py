from __future__ import annotations

from typing import Any

import pytest

from app.memory.facts import Fact
from app.memory.rules import RuleExtractor

OPTIONS_SUMMARY = "\n".join(
    [
        "User: I need a flight from Lisbon to Berlin on Friday.",
        "Assistant: Option 1: Window seat on the 7am flight, 120 EUR.",
        "Assistant: Option 2: Aisle seat on the 9am flight, 95 EUR.",
        "Assistant: Would you like me to book one?",
    ]
)


def said(*texts: str, summary: str = "") -> list[Fact]:
    return RuleExtractor().extract([{"role": "user", "content": t} for t in texts], summary)


def contents(facts: list[Fact]) -> list[str]:
    return [f.content for f in facts]


# -- the table: utterance -> facts about the user ----------------------------

TABLE: list[tuple[str, list[tuple[str, str]]]] = [
    ("I'm allergic to peanuts, please keep that in mind.",
     [("allergy", "is allergic to peanuts")]),
    ("My name is Ana.", [("name", "is named Ana")]),
    ("my name is ana silva", [("name", "is named Ana Silva")]),
    ("Hi, I'm Ana Silva!", [("name", "is named Ana Silva")]),
    ("Call me Bo", [("name", "is named Bo")]),
    ("I'm tired", []),
    ("I'm Italian", []),
    ("I live in Lisbon", [("location", "lives in Lisbon")]),
    ("I currently live in St. Louis, Missouri.", [("location", "lives in St. Louis, Missouri")]),
    ("I moved to Berlin last year.", [("location", "lives in Berlin")]),
    ("I'm from Porto originally", [("location", "is from Porto")]),
    ("I WORK AT ACME", [("work", "works at ACME")]),
    ("I work for the city council", [("work", "works for the city council")]),
    ("I work as a nurse", [("work", "works as a nurse")]),
    ("I like jazz", [("preference", "likes jazz")]),
    ("I really love hiking in the mountains.", [("preference", "loves hiking in the mountains")]),
    ("i enjoy cooking", [("preference", "enjoys cooking")]),
    ("I prefer window seats", [("preference", "prefers window seats")]),
    ("I don\u2019t like olives", [("dislike", "doesn't like olives")]),
    ("I hate flying because it's scary", [("dislike", "hates flying")]),
    ("I dislike crowds", [("dislike", "dislikes crowds")]),
    ("I'm allergic to peanuts", [("allergy", "is allergic to peanuts")]),
    ("im severely allergic to shellfish.", [("allergy", "is allergic to shellfish")]),
    ("I have a peanut allergy", [("allergy", "has a peanut allergy")]),
    ("I've got a severe nut allergy", [("allergy", "has a severe nut allergy")]),
    ("I'm planning to visit Japan in April", [("plan", "plans to visit Japan in April")]),
    ("I plan to run a marathon next year", [("plan", "plans to run a marathon next year")]),
    ("I'm going to Paris next week", [("plan", "plans to go to Paris next week")]),
    ("I'm going to need a taxi", []),
    ("I am planning a trip to Kyoto", [("plan", "plans a trip to Kyoto")]),
    ("I'm planning a trip to Kyoto in May.", [("plan", "plans a trip to Kyoto in May")]),
    ("I plan a lot", []),
    ("Remember that my passport expires in June.", [("note", "their passport expires in June")]),
    ("Please remember my anniversary is on May 3", [("note", "their anniversary is on May 3")]),
    ("Do I like jazz?", []),
    ("If I lived in Paris I would eat croissants daily.", []),
    ("My brother lives in Rome", []),
    ("I'd love to live in Paris", []),
    ("I lived in Rome for years", []),
    ("I'm not allergic to anything", []),
    ("I love it!", []),
]


@pytest.mark.parametrize(("utterance", "expected"), TABLE, ids=[t[0] for t in TABLE])
def test_common_phrasings_yield_the_expected_facts(
    utterance: str, expected: list[tuple[str, str]]
) -> None:
    assert [(f.kind, f.content) for f in said(utterance)] == expected


# -- behaviour ---------------------------------------------------------------


def test_a_question_about_a_preference_is_not_extracted_as_one() -> None:
    assert said("Do I like spicy food?", "do i really like jazz") == []


def test_a_question_ending_in_a_question_mark_is_not_a_statement() -> None:
    assert said("I live in Lisbon, right?") == []


def test_a_hypothetical_is_not_a_fact_about_the_user() -> None:
    assert said("If I lived in Paris, I would love the bakeries.") == []
    assert said("Suppose I work at Google, what then?") == []


def test_a_third_party_is_not_mistaken_for_the_user() -> None:
    assert said(
        "My brother lives in Rome.", "My wife works at Google.", "She said I'm going to love it."
    ) == []


def test_a_negated_statement_is_not_extracted_as_its_opposite() -> None:
    assert said("I don't live in Paris anymore.", "I'm not allergic to anything.") == []


def test_a_shared_subject_across_and_yields_both_facts() -> None:
    facts = said("I live in Lisbon and work at Acme.")
    assert contents(facts) == ["lives in Lisbon", "works at Acme"]


def test_a_name_followed_by_another_clause_yields_both_facts() -> None:
    assert contents(said("I'm Ana and I live in Lisbon")) == ["is named Ana", "lives in Lisbon"]


def test_a_remembered_statement_about_the_user_becomes_that_kind_of_fact() -> None:
    assert said("Remember that I'm allergic to nuts.") == [Fact("allergy", "is allergic to nuts")]


def test_a_polite_request_to_remember_is_a_note_even_as_a_question() -> None:
    assert said("Can you remember that I'm vegetarian?") == [Fact("note", "they are vegetarian")]


def test_remember_when_is_reminiscing_not_a_note() -> None:
    assert said("Remember when we talked about Rome?") == []


def test_only_user_messages_are_mined_for_facts() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "assistant", "content": "I live in the cloud and I love helping."},
        {"role": "system", "content": "I am allergic to nothing."},
        {"role": "tool", "content": "My name is WebSearch."},
        {"role": "user", "content": "I live in Porto."},
    ]
    assert RuleExtractor().extract(messages, "") == [Fact("location", "lives in Porto")]


def test_the_same_fact_said_twice_is_returned_once() -> None:
    assert said("I like jazz.", "Oh, and I like jazz!") == [Fact("preference", "likes jazz")]


def test_a_pronoun_object_is_not_a_memory() -> None:
    assert said("I like that idea.", "I'm going to do that.", "I love you") == []


def test_the_users_possessions_are_written_in_the_third_person() -> None:
    assert said("I love my dog") == [Fact("preference", "loves their dog")]


def test_content_given_as_parts_is_mined() -> None:
    facts = RuleExtractor().extract(
        [{"role": "user", "content": [{"type": "text", "text": "I work at Acme."}]}], ""
    )
    assert facts == [Fact("work", "works at Acme")]


# -- resolving a confirmation against proposals ------------------------------


def test_book_that_one_resolves_to_the_summarys_last_proposal() -> None:
    facts = said("yes, book that one", summary=OPTIONS_SUMMARY)
    assert facts == [Fact("plan", "wants to book aisle seat on the 9am flight, 95 EUR")]


def test_do_that_one_records_the_choice() -> None:
    assert contents(said("Yes, do that one.", summary=OPTIONS_SUMMARY)) == [
        "chose aisle seat on the 9am flight, 95 EUR"
    ]


def test_an_ordinal_picks_the_numbered_option() -> None:
    assert contents(said("The first one please", summary=OPTIONS_SUMMARY)) == [
        "chose window seat on the 7am flight, 120 EUR"
    ]
    assert contents(said("Could you book option 1?", summary=OPTIONS_SUMMARY)) == [
        "wants to book window seat on the 7am flight, 120 EUR"
    ]


def test_an_option_that_was_not_offered_resolves_to_nothing() -> None:
    assert said("book the fifth one", summary=OPTIONS_SUMMARY) == []


def test_a_confirmation_without_any_proposal_yields_nothing() -> None:
    assert said("yes, book that one", summary="User: I live in Lisbon.") == []


def test_a_vague_yes_is_not_resolved() -> None:
    assert said("yes please", "that", summary=OPTIONS_SUMMARY) == []


def test_a_proposal_in_the_delta_supersedes_the_summary() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "assistant", "content": "How about the Hotel Astoria near the station?"},
        {"role": "user", "content": "Great, book that one."},
    ]
    facts = RuleExtractor().extract(messages, OPTIONS_SUMMARY)
    assert facts == [Fact("plan", "wants to book the Hotel Astoria near the station")]


def test_planning_a_trip_is_a_plan_as_much_as_planning_to_visit() -> None:
    assert contents(said("I am planning a trip to Kyoto")) == ["plans a trip to Kyoto"]
    assert contents(said("I plan to visit Kyoto")) == ["plans to visit Kyoto"]
    assert said("My sister is planning a trip to Rome.") == []


def test_a_sentence_inside_a_quote_is_reported_speech_not_the_users_own() -> None:
    assert said('She told me "Go home. I live in Rome." She was joking.') == []
    assert contents(said('He wrote \u201cCall me. I work at Acme.\u201d I live in Oslo.')) == [
        "lives in Oslo"
    ]
