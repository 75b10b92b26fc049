"""The OpenAI-compatible face: the Responses and Conversations APIs over the same
sessions, turns and event log as the native routes (docs/openai-compatible.md).

A conversation is a session (`conv_<sid>`), a response is one turn of it
(`resp_<sid>_<turn>`), items and stream events are projections of the session's
messages and of the turn's resumable event log. Nothing here runs a turn of its
own: `app.chat.routes.start_turn` does, for both faces.

    ids           conv_/resp_/item ids <-> sessions, turns, positions
    errors        OpenAI's error body and statuses, for these routes only
    items         messages -> conversation items and response output; request input
    events        the turn's events -> Responses stream events with sequence numbers
    records       what a response's request said (model, instructions, metadata)
    conversations /v1/conversations routes
    responses     /v1/responses routes
"""
