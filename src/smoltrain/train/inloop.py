"""Evaluation inside the training loop: held-out loss and bits per byte, downstream tasks, samples.

It works on the unwrapped model and puts it back in train mode after each pass; it never touches the
optimizer, so evaluating changes nothing about the training trajectory. Records go to the run's RunLog
(rank 0 only) and lines to the trainer's print function.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from smoltrain.eval.bpb import TokenTables, evaluate_datasets, val_record
from smoltrain.model.generate import SamplingConfig, generate

if TYPE_CHECKING:
    from smoltrain.checkpoint.context import RunContext
    from smoltrain.config import Config
    from smoltrain.data.tokenizer import Tokenizer
    from smoltrain.distributed import DistEnv
    from smoltrain.model.llama import SmolLM2
    from smoltrain.train.runlog import RunLog


def in_loop_tasks(cfg: Config, dist: DistEnv, val_paths: dict[str, Path] | None) -> list:
    """eval.tasks, loaded before step 1; rank 0 scores them (FSDP shards the weights, so not there)."""
    if not dist.is_main or dist.strategy == "fsdp" or not cfg.eval.tasks:
        return []
    from smoltrain.eval.configured import load_eval_tasks

    return load_eval_tasks(cfg, val_paths)


class InLoopEval:
    """The periodic evaluations of one run: what to evaluate on, and how to report it."""

    def __init__(self, run: RunContext, model: SmolLM2, tokenizer: Tokenizer, val_paths: dict[str, Path] | None,
                 tasks: list, log: RunLog | None):
        self.run = run
        self.ev = run.cfg.eval
        self.train = run.cfg.train
        self.model = model  # unwrapped (FSDP shards it in place)
        self.tokenizer = tokenizer
        self.val_paths = val_paths  # None for a stream: it has no held-out split
        self.tasks = tasks
        self.log = log  # the run's log on rank 0, None elsewhere
        self.token_tables = TokenTables(tokenizer).to(run.device) if val_paths is not None else None

    def evaluate(self, step: int) -> dict | None:
        """Every dataset's whole held-out split (or eval.max_tokens of it), as `smoltrain eval` does."""
        if self.val_paths is None:
            return None
        train = self.train
        self.model.eval()
        fwd = lambda x, y: self.model(x, labels=y, loss_chunk=train.loss_chunk, reduction="none")  # noqa: E731
        results = evaluate_datasets(fwd, self.val_paths, "val", train.seq_len, train.micro_batch_size,
                                    self.ev.max_tokens, self.run.device, self.token_tables, self.run.autocast)
        self.model.train()
        if not results:
            return None
        rec = val_record(step, results)
        if self.log is not None:
            self.log.log(rec)
            self.run.say(f"step {step}: val loss {rec['val_loss']:.4f} (ppl {rec['val_ppl']:.2f}"
                       f"{_bpb_text(rec)}{_per_dataset_text(results)})")
        return rec

    def evaluate_tasks(self, step: int) -> None:
        """acc / acc_norm of each eval.tasks task, as task/<name>/... records."""
        if not self.tasks:
            return
        from smoltrain.eval.tasks import score_in_loop

        scores = score_in_loop(self.model, self.tokenizer, self.tasks, self.run.device, self.run.autocast)
        self.model.train()
        self.log.log({"step": step, **scores})
        self.run.say(f"step {step}: " + ", ".join(f"{k[5:]} {v:.3f}" for k, v in scores.items()))

    def samples(self, step: int) -> None:
        """A greedy and a sampled continuation of each eval.prompts prompt (rank 0; not under FSDP)."""
        if not self.run.dist.is_main or self.run.dist.strategy == "fsdp":
            return
        ev = self.ev
        tok = self.tokenizer
        self.model.eval()
        sampled = SamplingConfig(ev.temperature, ev.top_k, ev.top_p)
        for prompt in ev.prompts:
            for mode, sc in (("greedy", SamplingConfig(0)), ("sampled", sampled)):
                ids = generate(self.model, tok.encode(prompt), ev.sample_tokens, sc,
                               seed=self.train.seed + step, stop_ids=[tok.eot_id])
                text = tok.decode(list(ids))
                self.log.sample({"step": step, "mode": mode, "prompt": prompt, "text": text})
                self.run.say(f"[step {step} {mode}] {prompt}{text}")
        self.log.samples_done(step)
        self.model.train()


def _bpb_text(rec: dict) -> str:
    if not rec["val_bpb"]:
        return ""
    return f", {rec['val_bpb']:.3f} bits/byte"


def _per_dataset_text(results: dict[str, dict]) -> str:
    """Each dataset's loss, when there are several."""
    if len(results) <= 1:
        return ""
    return "".join(f"; {n} {r['loss']:.4f}" for n, r in results.items())
