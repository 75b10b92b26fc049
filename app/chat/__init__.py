"""One chat turn: the turn, the tool router, the event log, context, routes."""
