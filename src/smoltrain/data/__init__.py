"""The data pipeline: sources -> prepare (token shards + meta.json) -> loader (packed batches).

Submodules are imported where needed: `sources`, `shards` and `prepare` need no torch, `loader` and `stream`
do.
"""
