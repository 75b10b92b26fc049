"""The MCP server: the project's memory and knowledge base as tools for agents (docs/mcp.md)."""
