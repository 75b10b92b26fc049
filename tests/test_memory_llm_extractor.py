"""The LLM extractor against a real HTTP server on loopback speaking the chat-completions format.

The server answers from a script, one reply per request, and records every
request, so each test states what the "model" says and checks what it was asked.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from app.errors import DependencyError
from app.memory import LLMExtractor, LLMUnavailable, RuleExtractor, make_extractor
from app.memory.facts import Fact, validate_facts
from app.settings import Settings

DELTA: list[dict[str, Any]] = [
    {"role": "assistant", "content": "Where are you flying from?"},
    {"role": "user", "content": "From Lisbon, I live there. And I'm allergic to peanuts."},
]
GOOD = {
    "facts": [
        {"kind": "location", "content": "lives in Lisbon"},
        {"kind": "allergy", "content": "is allergic to peanuts"},
    ]
}


@dataclasses.dataclass
class FakeModel:
    """The scripted replies (status, body) and the requests received."""

    url: str
    replies: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    requests: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def answer(self, content: str) -> None:
        completion = {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "model": "test-model",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
        }
        self.replies.append((200, json.dumps(completion)))


def _handler(model: FakeModel) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            model.requests.append(
                {
                    "path": self.path,
                    "authorization": self.headers.get("Authorization"),
                    "body": json.loads(self.rfile.read(length)),
                }
            )
            status, body = model.replies.pop(0) if model.replies else (500, "script exhausted")
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep the test output quiet

    return Handler


@pytest.fixture
def model() -> Iterator[FakeModel]:
    fake = FakeModel(url="")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    fake.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield fake
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def extractor(model: FakeModel, api_key: str | None = None) -> LLMExtractor:
    return LLMExtractor(model.url, model="test-model", api_key=api_key, timeout=5.0)


def test_good_json_from_the_model_becomes_facts(model: FakeModel) -> None:
    model.answer(json.dumps(GOOD))
    facts = extractor(model).extract(DELTA, "User: I need a flight to Berlin.")
    assert facts == [Fact("location", "lives in Lisbon"), Fact("allergy", "is allergic to peanuts")]


def test_the_request_is_a_non_streaming_json_mode_chat_completion(model: FakeModel) -> None:
    model.answer(json.dumps(GOOD))
    extractor(model, api_key="sk-test").extract(DELTA, "User: I need a flight to Berlin.")
    [request] = model.requests
    body = request["body"]
    assert request["path"] == "/v1/chat/completions"
    assert request["authorization"] == "Bearer sk-test"
    assert body["model"] == "test-model"
    assert body["response_format"] == {"type": "json_object"}
    assert body["stream"] is False
    prompt = body["messages"][-1]["content"]
    assert "User: I need a flight to Berlin." in prompt
    assert "user: From Lisbon, I live there." in prompt


def test_bad_json_is_retried_once_with_the_error_shown_to_the_model(model: FakeModel) -> None:
    model.answer('{"facts": [{"kind": "location", "content": "lives in Lis')
    model.answer(json.dumps(GOOD))
    facts = extractor(model).extract(DELTA, "")
    assert facts == [Fact("location", "lives in Lisbon"), Fact("allergy", "is allergic to peanuts")]
    retry = model.requests[1]["body"]["messages"]
    assert retry[-2] == {
        "role": "assistant",
        "content": '{"facts": [{"kind": "location", "content": "lives in Lis',
    }
    assert "invalid" in retry[-1]["content"]


def test_a_wrong_shape_counts_as_bad_json_and_is_retried(model: FakeModel) -> None:
    model.answer(json.dumps({"facts": [{"kind": "hobby", "content": "plays chess"}]}))
    model.answer(json.dumps({"facts": [{"kind": "preference", "content": "likes chess"}]}))
    assert extractor(model).extract(DELTA, "") == [Fact("preference", "likes chess")]
    assert "hobby" in model.requests[1]["body"]["messages"][-1]["content"]


def test_bad_json_twice_raises_a_clear_llm_unavailable_error(model: FakeModel) -> None:
    model.answer("Sure! Here are the facts: the user lives in Lisbon.")
    model.answer("```\nnot json either\n```")
    with pytest.raises(LLMUnavailable) as info:
        extractor(model).extract(DELTA, "")
    assert isinstance(info.value, DependencyError)
    assert info.value.code == "llm_unavailable"
    assert info.value.status == 503
    assert "invalid facts twice" in info.value.message
    assert len(model.requests) == 2


def test_an_http_500_raises_llm_unavailable_without_retrying(model: FakeModel) -> None:
    model.replies.append((500, '{"error": {"message": "model overloaded"}}'))
    with pytest.raises(LLMUnavailable) as info:
        extractor(model).extract(DELTA, "")
    assert "HTTP 500" in info.value.message
    assert "model overloaded" in info.value.message
    assert len(model.requests) == 1


def test_a_reply_that_is_not_a_chat_completion_raises_llm_unavailable(model: FakeModel) -> None:
    model.replies.append((200, '{"object": "error"}'))
    with pytest.raises(LLMUnavailable, match="did not answer a chat completion"):
        extractor(model).extract(DELTA, "")


def test_json_wrapped_in_a_code_fence_is_accepted(model: FakeModel) -> None:
    model.answer("```json\n" + json.dumps(GOOD) + "\n```")
    assert len(extractor(model).extract(DELTA, "")) == 2


def test_empty_oversized_and_repeated_facts_are_dropped(model: FakeModel) -> None:
    model.answer(
        json.dumps(
            {
                "facts": [
                    {"kind": "work", "content": "The user works at Acme."},
                    {"kind": "work", "content": "works at acme"},
                    {"kind": "note", "content": "   "},
                    {"kind": "note", "content": "x" * 201},
                ]
            }
        )
    )
    assert extractor(model).extract(DELTA, "") == [Fact("work", "works at Acme")]


def test_a_delta_without_user_text_makes_no_request(model: FakeModel) -> None:
    delta: list[dict[str, Any]] = [{"role": "assistant", "content": "Anything else?"}]
    assert extractor(model).extract(delta, "") == []
    assert model.requests == []


def test_an_unreachable_server_raises_llm_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the request: nothing listens
    llm = LLMExtractor(f"http://127.0.0.1:{port}/v1", model="m", timeout=2.0)
    with pytest.raises(LLMUnavailable, match="unreachable"):
        llm.extract(DELTA, "")


def test_make_extractor_picks_the_llm_only_when_a_base_url_is_set() -> None:
    assert isinstance(make_extractor(Settings()), RuleExtractor)
    llm = make_extractor(Settings(llm_base_url="http://127.0.0.1:1/v1/", llm_model="m"))
    assert isinstance(llm, LLMExtractor)
    assert llm.url == "http://127.0.0.1:1/v1/chat/completions"


@pytest.mark.parametrize(
    "raw",
    [
        [],
        "facts",
        {},
        {"facts": {"kind": "name", "content": "is named Ana"}},
        {"facts": ["is named Ana"]},
        {"facts": [{"kind": "hobby", "content": "plays chess"}]},
        {"facts": [{"kind": "name", "content": 7}]},
        {"facts": [{"content": "is named Ana"}]},
    ],
)
def test_validate_facts_refuses_a_wrong_shape(raw: object) -> None:
    with pytest.raises(ValueError):
        validate_facts(raw)


def test_validate_facts_accepts_an_empty_list() -> None:
    assert validate_facts({"facts": []}) == []
