"""A Responses stream survives its client: two app processes share the stores; the SDK
reads a few events from one, drops the connection, and resumes on the other with
`responses.retrieve(id, stream=True, starting_after=N)`."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
import redis
from live import app_process
from openai_support import Clients
from waits import wait_until

from app.embeddings import shared_embedder
from app.kb.ingest import ingest_paths
from app.settings import Settings
from app.stores import keys

CORPUS = Path(__file__).resolve().parent.parent / "app" / "kb" / "corpus"


def test_a_dropped_response_stream_resumes_on_another_node_with_every_event_once(
    settings: Settings, sdk: Clients, user: str
) -> None:
    client = redis.Redis.from_url(settings.redis_url or "")
    ingest_paths(client, shared_embedder(), [CORPUS], progress=False)
    client.close()
    pace = {"OFFLINE_TOKEN_DELAY_MS": "10", "STREAM_COALESCE_MS": "25"}
    with app_process(settings, **pace) as (node_a, _), app_process(settings, **pace) as (node_b, _):
        a, b = sdk(node_a, user), sdk(node_b, user)
        conv = a.conversations.create()
        head = []
        with a.responses.create(model="m", conversation=conv.id, stream=True,
                                input="How does Redis persist data with AOF?") as stream:
            for event in stream:
                head.append(event)
                if sum(e.type == "response.output_text.delta" for e in head) == 3:
                    break  # leaving the block closes the connection mid-turn
        answer_id = head[0].response.id  # type: ignore[union-attr]
        last = head[-1].sequence_number

        tail = list(b.responses.retrieve(answer_id, stream=True, starting_after=last))
        assert tail[-1].type == "response.completed"
        numbers = [e.sequence_number for e in [*head, *tail]]
        assert numbers == list(range(len(numbers)))  # each event once, none missing
        text = "".join(e.delta for e in [*head, *tail]  # type: ignore[union-attr]
                       if e.type == "response.output_text.delta")
        done = tail[-1].response  # type: ignore[union-attr]
        assert text == done.output_text and "[1]" in text

        # From the middle again, on the first node: the same events, numbered the same.
        again = list(a.responses.retrieve(answer_id, stream=True, starting_after=last - 2))
        assert [e.sequence_number for e in again] == numbers[last - 1:]
        assert [e.model_dump() for e in again[2:]] == [e.model_dump() for e in tail]
        stored = b.responses.retrieve(answer_id)
        assert stored.status == "completed" and stored.output_text == text
        assert stored.conversation is not None and stored.conversation.id == conv.id


def test_streamed_responses_and_their_resumes_hold_the_user_s_stream_slots(
    settings: Settings, sdk: Clients, user: str
) -> None:
    sr = redis.Redis.from_url(settings.redis_url or "")
    with app_process(settings, MAX_STREAMS_PER_USER="1", OFFLINE_TOKEN_DELAY_MS="300") as (
        base, _,
    ):
        client = sdk(base, user)
        conv = client.conversations.create()
        with client.responses.create(model="m", conversation=conv.id, stream=True,
                                     input="a long one") as stream:
            first = next(iter(stream))
            answer_id = first.response.id  # type: ignore[union-attr]
            # The open stream holds the one slot: another stream, or a resume, is refused.
            with pytest.raises(openai.RateLimitError) as refused:
                client.responses.create(model="m", input="another", stream=True)
            assert refused.value.code == "too_many_streams"
            with pytest.raises(openai.RateLimitError):
                list(client.responses.retrieve(answer_id, stream=True, starting_after=0))
            # A non-streamed read is no stream.
            assert client.responses.retrieve(answer_id).id == answer_id
        wait_until(lambda: sr.zcard(keys.streams(user)) == 0, "the stream's slot released")
        tail = list(client.responses.retrieve(answer_id, stream=True, starting_after=0))
        assert tail[-1].type == "response.completed"
        wait_until(lambda: sr.zcard(keys.streams(user)) == 0, "the resume's slot released")
    sr.close()
