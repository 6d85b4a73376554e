"""Scoring models: bits per byte on prepared splits (`bpb`), multiple-choice tasks with lm-eval's rules
(`tasks`), the next-line task built from held-out text, and a config's eval.tasks made real.
Imports the core modules, model, data, hf and checkpoint.discovery (the leaf that resolves a model path);
never training, the rest of checkpoints or the app.
"""
