"""smoltrain: pretrain SmolLM2-family language models from scratch and carry them to a usable model."""

__version__ = "0.1.0"
