"""Live sessions: the Redis copy, the PostgreSQL truth, messages, routes."""
