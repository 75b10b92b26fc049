"""The semantic cache in front of tools: lookup/store, hit decision, stats, routes."""
