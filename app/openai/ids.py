"""Ids of the OpenAI face, each a reversible name for something the backbone has.

    conv_<sid>                    a session
    resp_<sid>_<turn>             a turn: the seq of its user message
    msg_<sid>_<seq>               a message that no turn produced (user, seeded)
    msg|fs|ws|fc_<sid>_<turn>_<k> the k-th output item of a turn

Output ids come from the turn and the item's position, not from a message's seq,
so the stream names an item before it is stored, the same on every node and
in the history afterwards.
"""

from __future__ import annotations

import re

from app.errors import BadRequest

CONVERSATION = re.compile(r"^conv_(?P<sid>[0-9a-f]{32})$")
RESPONSE = re.compile(r"^resp_(?P<sid>[0-9a-f]{32})_(?P<turn>[0-9]{1,9})$")
ITEM_PREFIX = {"message": "msg", "file_search_call": "fs", "web_search_call": "ws",
               "function_call": "fc"}


def conversation_id(sid: str) -> str:
    return f"conv_{sid}"


def response_id(sid: str, turn: int) -> str:
    return f"resp_{sid}_{turn}"


def output_item_id(kind: str, sid: str, turn: int, k: int) -> str:
    return f"{ITEM_PREFIX[kind]}_{sid}_{turn}_{k}"


def message_item_id(sid: str, seq: int) -> str:
    return f"msg_{sid}_{seq}"


def parse_conversation(raw: object, param: str = "conversation") -> str:
    """The session id of `conv_<sid>`; 400 for anything else (no lookalike is loosened)."""
    m = CONVERSATION.fullmatch(raw) if isinstance(raw, str) else None
    if m is None:
        raise BadRequest("conversation ids look like conv_<32 lowercase hex>",
                         code="invalid_conversation_id", param=param)
    return m["sid"]


def parse_response(raw: object, param: str = "response_id") -> tuple[str, int]:
    """(session id, turn) of `resp_<sid>_<turn>`; 400 for anything else."""
    m = RESPONSE.fullmatch(raw) if isinstance(raw, str) else None
    if m is None:
        raise BadRequest("response ids look like resp_<32 lowercase hex>_<turn>",
                         code="invalid_response_id", param=param)
    return m["sid"], int(m["turn"])
