"""The Hugging Face formats: HF directories and GGUF files <-> model state (`interop`; the GGUF format
itself, read and written with llama.cpp's `gguf` package, in `gguf`), the model card, and the Hub.
Imports the core modules, model and data (the tokenizer), and checkpoint.discovery (a leaf that names and
finds a run's checkpoints, so a run dir resolves to its newest valid one); never the rest of checkpoints,
or training.
"""
