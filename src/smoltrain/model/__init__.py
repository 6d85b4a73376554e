"""The SmolLM2 decoder and what runs it: architecture config (LlamaConfig names), the decoder with its
KV cache, the fused chunked head + loss, CPU decode BLAS, and generation.

Imports only the core modules (errors, domain, device): it knows nothing of data, files, training or
the HF formats, so it can be read and tested on its own.
"""
