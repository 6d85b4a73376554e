"""The training run: `trainer` (train() -> train_step() -> forward_backward()), its setup, optimizers and
LR schedule, in-loop evaluation and samples, the run log (metrics.jsonl, trackers) and the console step
log. Imports everything below it (core, model, data, hf, checkpoint, eval); only app and cli import it.
"""
