"""Redis and PostgreSQL access: clients, keys, Lua scripts, indexes, migrations."""
