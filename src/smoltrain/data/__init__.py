"""Everything from raw text to batches: sources -> split -> prepare (token shards + meta.json) -> loader
(packed batches) or stream; the tokenizer, the offline assets, and `recipe` (a config's data section
made real: assets resolved, tokenizer trained, datasets prepared).

Imports the core modules only; never the model, training, checkpoints or evaluation. Submodules are
imported where needed: `sources`, `shards` and `prepare` need no torch, `loader` and `stream` do.
"""
