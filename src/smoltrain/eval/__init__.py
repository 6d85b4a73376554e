"""Scoring models: bits per byte on prepared splits (`bpb`), multiple-choice tasks with lm-eval's rules
(`tasks`), the next-line task built from held-out text, and a config's eval.tasks made real.
Imports the core modules, model, data and hf; never training, checkpoints' internals or the app.
"""
