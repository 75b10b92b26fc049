from __future__ import annotations

from typing import Any

from app.memory.summary import latest_proposals, split_sentences, update_summary

BOOKING: list[dict[str, Any]] = [
    {"role": "user", "content": "Hi! I need a flight from Lisbon to Berlin on Friday."},
    {
        "role": "assistant",
        "content": "Here are two options:\n"
        "1. Window seat on the 7am flight, 120 EUR.\n"
        "2. Aisle seat on the 9am flight, 95 EUR.\n"
        "Would you like me to book one?",
    },
    {"role": "user", "content": "Thanks!"},
]


def test_a_summary_keeps_who_said_each_sentence() -> None:
    summary = update_summary("", BOOKING)
    lines = summary.splitlines()
    assert "User: I need a flight from Lisbon to Berlin on Friday." in lines
    assert "Assistant: Option 2: Aisle seat on the 9am flight, 95 EUR." in lines


def test_greetings_and_thanks_are_left_out_of_the_summary() -> None:
    summary = update_summary("", BOOKING)
    assert "Thanks" not in summary
    assert "Hi!" not in summary


def test_numbered_list_items_become_named_options() -> None:
    assert split_sentences("Pick one:\n1. Tea.\n2) **Coffee**.") == [
        "Pick one:",
        "Option 1: Tea.",
        "Option 2: Coffee.",
    ]


def test_tool_results_and_system_prompts_are_not_summarised() -> None:
    summary = update_summary(
        "",
        [
            {"role": "system", "content": "You are a helpful travel agent in 2024."},
            {"role": "tool", "content": "Flight LH1167 departs 07:05 from LIS."},
        ],
    )
    assert summary == ""


def test_the_summary_never_exceeds_its_budget() -> None:
    summary = ""
    for i in range(40):
        summary = update_summary(
            summary,
            [{"role": "user", "content": f"Please add item {i} to the Berlin trip list."}],
            max_chars=300,
        )
        assert len(summary) <= 300


def test_newer_information_wins_over_equally_informative_older_information() -> None:
    summary = ""
    for city in ["Paris", "Rome", "Oslo", "Vienna", "Prague", "Madrid"]:
        summary = update_summary(
            summary,
            [{"role": "user", "content": f"Please find hotels in {city} for 2 nights."}],
            max_chars=160,
        )
    assert "Madrid" in summary
    assert "Prague" in summary
    assert "Paris" not in summary


def test_a_fact_about_the_user_outlives_small_talk_under_a_tight_budget() -> None:
    summary = update_summary(
        "", [{"role": "user", "content": "I am allergic to peanuts, so keep that in mind."}]
    )
    for _ in range(5):
        summary = update_summary(
            summary,
            [{"role": "assistant", "content": "That is a good question to ask about it."}],
            max_chars=120,
        )
    assert "allergic to peanuts" in summary


def test_summarising_is_deterministic() -> None:
    assert update_summary("", BOOKING) == update_summary("", BOOKING)


def test_a_sentence_said_twice_is_kept_once_at_its_latest_place() -> None:
    summary = update_summary("", BOOKING)
    again = update_summary(
        summary, [{"role": "user", "content": "I need a flight from Lisbon to Berlin on Friday."}]
    )
    lines = again.splitlines()
    assert lines.count("User: I need a flight from Lisbon to Berlin on Friday.") == 1
    assert lines[-1] == "User: I need a flight from Lisbon to Berlin on Friday."


def test_a_summary_from_elsewhere_is_rolled_forward_sentence_by_sentence() -> None:
    summary = update_summary(
        "The user is planning a trip to Japan in April. They asked about rail passes.", []
    )
    assert summary.splitlines() == [
        "The user is planning a trip to Japan in April.",
        "They asked about rail passes.",
    ]


def test_message_content_given_as_parts_is_summarised() -> None:
    summary = update_summary(
        "",
        [{"role": "user", "content": [{"type": "text", "text": "I work at Acme in Porto."}]}],
    )
    assert summary == "User: I work at Acme in Porto."


def test_the_latest_proposals_come_from_the_last_proposing_assistant_turn() -> None:
    summary = "\n".join(
        [
            "Assistant: Option 1: Hotel Astoria, 80 EUR a night.",
            "User: Something cheaper please.",
            "Assistant: Option 1: Window seat on the 7am flight.",
            "Assistant: Option 2: Aisle seat on the 9am flight.",
            "User: yes, book that one",
        ]
    )
    assert latest_proposals(summary) == [
        "Option 1: Window seat on the 7am flight.",
        "Option 2: Aisle seat on the 9am flight.",
    ]


def test_a_summary_without_proposals_has_none() -> None:
    assert latest_proposals("User: I live in Lisbon.\nAssistant: Noted.") == []


def test_a_quote_is_not_split_so_its_sentences_keep_their_speaker() -> None:
    # The offline provider echoes the question; split, its tail read as the assistant's.
    question = "I am planning a trip to Kyoto. Can you help?"
    summary = update_summary("", [
        {"role": "user", "content": question},
        {"role": "assistant", "content": f'I cannot answer freely. You wrote: "{question}"'},
    ])  # fmt: skip
    lines = summary.splitlines()
    assert "User: Can you help?" in lines and 'Assistant: Can you help?"' not in lines
    assert f'Assistant: You wrote: "{question}"' in lines


def test_a_sentence_ending_in_a_closing_quote_still_ends_there() -> None:
    assert split_sentences('She said \u201cGo. Now.\u201d Then she left. Ok "fine." Bye.') == [
        "She said \u201cGo. Now.\u201d", "Then she left.", 'Ok "fine."', "Bye.",
    ]
    assert split_sentences('An odd " mark. Then more.') == ['An odd " mark.', "Then more."]
