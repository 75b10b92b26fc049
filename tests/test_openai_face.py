"""The Responses and Conversations APIs, driven by the official `openai` SDK against a
real server: conversations, streamed and non-streamed responses, items, chaining,
instructions, metadata, store, and the errors the SDK maps to its classes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from docs_pages import ROOT, section, shell_blocks
from fakes import FakeOpenAI, text_reply
from openai_support import Clients, served

from app.settings import Settings

QUESTION = "How does Redis persist data with AOF?"


@pytest.fixture(scope="module")
def base(settings: Settings) -> Iterator[str]:
    with served(settings, offline_token_delay_ms=0) as url:
        yield url


def test_a_conversation_answers_and_lists_its_history_as_items(
    base: str, settings: Settings, sdk: Clients, user: str
) -> None:
    client = sdk(base, user)
    conv = client.conversations.create(metadata={"topic": "persistence"})
    assert conv.id.startswith("conv_") and conv.metadata == {"topic": "persistence"}

    first = client.responses.create(model="my-model", conversation=conv.id, input=QUESTION)
    assert first.status == "completed" and first.model == "my-model"
    assert first.conversation is not None and first.conversation.id == conv.id
    assert [item.type for item in first.output] == ["file_search_call", "message"]
    assert first.output_text and first.usage is not None and first.usage.output_tokens > 0

    second = client.responses.create(model="my-model", conversation={"id": conv.id},
                                     input="And with RDB snapshots?")
    assert second.id != first.id and second.output_text

    page = client.conversations.items.list(conv.id, order="asc")
    kinds = [(item.type, getattr(item, "role", None)) for item in page.data]
    assert kinds == [("message", "user"), ("file_search_call", None), ("message", "assistant")] * 2
    assert page.data[0].content[0].text == QUESTION  # type: ignore[union-attr]
    # The assistant's item is the response's output item: same id, same text.
    assert page.data[2].id == first.output[1].id
    assert page.data[2].content[0].text == first.output_text  # type: ignore[union-attr]
    newest = client.conversations.items.list(conv.id, limit=2)
    assert [i.id for i in newest.data] == [page.data[5].id, page.data[4].id] and newest.has_more
    rest = client.conversations.items.list(conv.id, limit=10, after=newest.data[-1].id)
    assert [i.id for i in rest.data] == [i.id for i in reversed(page.data[:4])]
    assert not rest.has_more

    client.conversations.update(conv.id, metadata={"topic": "rdb"})
    assert client.conversations.retrieve(conv.id).metadata == {"topic": "rdb"}


def test_a_streamed_response_sends_the_typed_events_in_order_with_increasing_numbers(
    base: str, settings: Settings, sdk: Clients, user: str
) -> None:
    client = sdk(base, user)
    conv = client.conversations.create()
    with client.responses.create(model="m", conversation=conv.id, input=QUESTION,
                                 stream=True) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[2:7] == [
        "response.output_item.added", "response.file_search_call.in_progress",
        "response.file_search_call.searching", "response.file_search_call.completed",
        "response.output_item.done",
    ]
    assert kinds[7:9] == ["response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert set(kinds[9:-4]) == {"response.output_text.delta"}
    done = events[-1].response  # type: ignore[union-attr]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == done.output_text and done.status == "completed"
    stored = client.responses.retrieve(done.id)
    assert stored.output_text == text and stored.status == "completed"
    assert [i.id for i in stored.output] == [i.id for i in done.output]


def test_previous_response_id_continues_the_session_and_an_older_one_is_refused(
    base: str, settings: Settings, sdk: Clients, user: str
) -> None:
    client = sdk(base, user)
    first = client.responses.create(model="m", input=QUESTION)
    assert first.conversation is None
    second = client.responses.create(model="m", input="Tell me more.",
                                     previous_response_id=first.id)
    assert second.previous_response_id == first.id
    # One session: the second turn's items follow the first's.
    assert second.id.rsplit("_", 1)[0] == first.id.rsplit("_", 1)[0]
    third = client.responses.create(model="m", input="And?", previous_response_id=second.id)
    assert third.status == "completed"
    with pytest.raises(openai.ConflictError):
        client.responses.create(model="m", input="Branch?", previous_response_id=first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="m", input="Ahead?",
                                previous_response_id=first.id.rsplit("_", 1)[0] + "_999")


def test_instructions_reach_the_model_for_that_response_only_and_metadata_is_kept(
    settings: Settings, sdk: Clients, user: str
) -> None:
    fake = FakeOpenAI()
    fake.script(text_reply("Short."), text_reply("Again."))
    with fake.serve() as llm, served(settings, llm_base_url=f"{llm}/v1") as url:
        client = sdk(url, user)
        first = client.responses.create(model="any", input="Hello there",
                                        instructions="Answer in five words.",
                                        metadata={"ticket": "T-1"})
        assert first.output_text == "Short." and first.instructions == "Answer in five words."
        assert client.responses.retrieve(first.id).metadata == {"ticket": "T-1"}
        second = client.responses.create(model="any", input="Hello again",
                                         previous_response_id=first.id)
    assert second.output_text == "Again."
    system = [m["content"] for m in fake.requests[0]["messages"] if m["role"] == "system"]
    assert "Answer in five words." in system[0]
    later = fake.requests[1]["messages"]
    assert "Answer in five words." not in later[0]["content"]
    # The second response sees the first exchange: its request carries it.
    assert [m["content"] for m in later[1:]] == ["Hello there", "Short.", "Hello again"]


def test_a_response_with_store_false_is_not_kept(
    base: str, settings: Settings, sdk: Clients, user: str
) -> None:
    client = sdk(base, user)
    answer = client.responses.create(model="m", input=QUESTION, store=False)
    assert answer.output_text and answer.store is False  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    while True:  # the session goes once the turn has persisted and run its hooks
        try:
            client.responses.retrieve(answer.id)
        except openai.NotFoundError:
            break
        assert time.monotonic() < deadline, "a store: false response is still retrievable"
        time.sleep(0.05)
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="m", input=QUESTION, store=False,
                                conversation=client.conversations.create().id)


def _raw(base: str, settings: Settings, user: str, method: str, path: str,
         **kw: Any) -> httpx.Response:
    from app.auth import issue_token

    token = issue_token(settings.auth_secret or "", user)
    return httpx.request(method, f"{base}{path}", headers={"Authorization": f"Bearer {token}"},
                         **kw)


def test_errors_have_openai_s_shape_and_map_to_the_sdk_s_classes(
    base: str, settings: Settings, sdk: Clients, user: str
) -> None:
    with openai.OpenAI(base_url=f"{base}/v1", api_key="not-a-token", max_retries=0) as anonymous, \
            pytest.raises(openai.AuthenticationError) as auth:
        anonymous.conversations.create()
    body = auth.value.body
    assert isinstance(body, dict) and body["message"].startswith("invalid token")
    assert {k: body[k] for k in ("type", "param", "code")} == {
        "type": "authentication_error", "param": None, "code": "unauthorized"}
    client = sdk(base, user)
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve("conv_" + "0" * 32)
    with pytest.raises(openai.BadRequestError) as bad:
        client.responses.create(model="m", input=[{"role": "assistant", "content": "hi"}])
    assert bad.value.param == "input"  # type: ignore[attr-defined]
    with pytest.raises(openai.BadRequestError):
        client.conversations.create(metadata={"k": "v" * 513})
    reply = _raw(base, settings, user, "GET", "/v1/responses/resp_nope")
    assert reply.status_code == 400
    assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
    # Digits of other scripts, which int() would take, are not numbers here.
    answer = client.responses.create(model="m", input=QUESTION)
    conv = client.conversations.create()
    for path, param in ((f"/v1/responses/{answer.id}?stream=true&starting_after=\u0663",
                         "starting_after"),
                        (f"/v1/conversations/{conv.id}/items?limit=\u00b2", "limit")):
        reply = _raw(base, settings, user, "GET", path)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == param


def test_the_rate_limit_is_a_rate_limit_error_and_leaves_no_session_behind(
    settings: Settings, sdk: Clients, user: str
) -> None:
    with served(settings, offline_token_delay_ms=0, rate_limit_messages=1) as url:
        client = sdk(url, user)
        client.responses.create(model="m", input="one")
        with pytest.raises(openai.RateLimitError) as limited:
            client.responses.create(model="m", input="two")
        assert int(limited.value.response.headers["retry-after"]) > 0
        sessions = _raw(url, settings, user, "GET", "/v1/sessions").json()["sessions"]
    assert len(sessions) == 1


def test_the_docs_sdk_example_runs_as_printed(
    base: str, settings: Settings, user: str, tmp_path: Path
) -> None:
    page = (ROOT / "docs" / "openai-compatible.md").read_text()
    [script] = shell_blocks(section(page, "Five lines with the official SDK"))
    assert script.count("http://127.0.0.1:8000") == 1 and "--user alice" in script
    script = script.replace("http://127.0.0.1:8000", base).replace("--user alice",
                                                                   f"--user {user}")
    # It runs .venv/bin/... from the clone's root: the whole venv (its pyvenv.cfg too).
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    run = subprocess.run(["bash", "-ec", script], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "AUTH_SECRET": settings.auth_secret or "",
                                           "REDIS_URL": settings.redis_url or "",
                                           "DATABASE_URL": settings.database_url or ""})
    assert run.returncode == 0, run.stderr
    assert "offline stand-in" in run.stdout
    # It ran as the user the token names: the conversation is theirs.
    listed = _raw(base, settings, user, "GET", "/v1/sessions").json()["sessions"]
    assert len(listed) == 1 and listed[0]["messages"] >= 2


def _everything_on(client: openai.OpenAI, conv: str, answer: str
                   ) -> list[Callable[[], object]]:
    """Every route of the face, aimed at one conversation and one of its responses."""
    return [
        lambda: client.conversations.retrieve(conv),
        lambda: client.conversations.items.list(conv),
        lambda: client.conversations.update(conv, metadata={"k": "stolen"}),
        lambda: client.conversations.delete(conv),
        lambda: client.responses.retrieve(answer),
        lambda: list(client.responses.retrieve(answer, stream=True, starting_after=0)),
        lambda: client.responses.create(model="m", conversation=conv, input="hi"),
        lambda: client.responses.create(model="m", previous_response_id=answer, input="hi"),
    ]


def test_another_user_s_conversation_and_responses_are_refused_even_to_lookalike_ids(
    base: str, settings: Settings, sdk: Clients
) -> None:
    owner_id = f"alice.{uuid.uuid4().hex[:8]}"
    owner = sdk(base, owner_id)
    conv = owner.conversations.create(metadata={"k": "v"})
    answer = owner.responses.create(model="m", conversation=conv.id, input=QUESTION)
    before = [i.id for i in owner.conversations.items.list(conv.id).data]
    # Another user, the same id in another case, and lookalikes (l -> 1, . -> _).
    for intruder_id in ("bob", owner_id.upper(), owner_id.replace("l", "1"),
                        owner_id.replace(".", "_")):
        intruder = sdk(base, intruder_id)
        attempts = _everything_on(intruder, conv.id, answer.id)
        for attempt in attempts:
            with pytest.raises(openai.PermissionDeniedError):
                attempt()
    # Nothing changed: same items, same metadata, still there.
    assert [i.id for i in owner.conversations.items.list(conv.id).data] == before
    assert owner.conversations.retrieve(conv.id).metadata == {"k": "v"}
    # An id differing by case or by a lookalike character names nothing.
    sid = conv.id.removeprefix("conv_")
    for variant in ("conv_" + sid.upper(), "conv_" + sid.replace("a", "\u0430", 1),
                    "Conv_" + sid):
        if variant != conv.id:
            with pytest.raises(openai.BadRequestError):
                owner.conversations.retrieve(variant)


def test_deleting_a_conversation_mid_response_fails_the_stream_and_keeps_nothing(
    settings: Settings, sdk: Clients, user: str
) -> None:
    with served(settings, offline_token_delay_ms=30) as url:
        client = sdk(url, user)
        conv = client.conversations.create()
        events = []
        with client.responses.create(model="m", conversation=conv.id, input=QUESTION,
                                     stream=True) as stream:
            for event in stream:
                events.append(event)
                if event.type == "response.output_text.delta" and len(events) < 1000:
                    deleted = client.conversations.delete(conv.id)
                    assert deleted.deleted and deleted.id == conv.id
                    break
            events += list(stream)
        assert [e.type for e in events[-2:]] == ["error", "response.failed"]
        failed = events[-1].response  # type: ignore[union-attr]
        assert failed.status == "failed" and failed.error.message.startswith("session_deleted")
        answer_id = events[0].response.id  # type: ignore[union-attr]
        with pytest.raises(openai.NotFoundError):
            client.conversations.retrieve(conv.id)
        with pytest.raises(openai.NotFoundError):
            client.conversations.items.list(conv.id)
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(answer_id)
        with pytest.raises(openai.NotFoundError):  # a second writer after the delete
            client.responses.create(model="m", conversation=conv.id, input="Still there?")
