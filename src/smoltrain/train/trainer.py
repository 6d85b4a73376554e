"""The training loop: Trainer.train() -> train_step() -> forward_backward().

Every stateful part (model, optimizer, loader, scaler, RNG, and the loop counters: the Trainer's own
state_dict) is registered with the checkpointer, saved in each checkpoint and restored on resume, so a
killed run continues bit-identically on CPU. The learning rate is a pure function of the step
(optim.lr_at), so it needs no state. Evaluation (inloop.InLoopEval), saving (checkpoint.Checkpointer)
and step logging (steplog.StepLog) are collaborators that share one RunContext; the data comes from
train.setup, and where the run's files live from checkpoint.layout.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from pathlib import Path

import torch
from tqdm import tqdm

from smoltrain import distributed as dist_io
from smoltrain.checkpoint.checkpointer import Checkpointer
from smoltrain.checkpoint.context import RunContext
from smoltrain.checkpoint.layout import open_run_dir
from smoltrain.checkpoint.optimizer import OptimizerState
from smoltrain.checkpoint.resume import find_resume
from smoltrain.checkpoint.signals import StopRequest
from smoltrain.checkpoint.state import RNGState
from smoltrain.config import Config
from smoltrain.device import amp_dtype, pick_device
from smoltrain.errors import TrainingError
from smoltrain.faults import fault_point
from smoltrain.model.llama import IGNORE_INDEX
from smoltrain.train.inloop import InLoopEval, in_loop_tasks
from smoltrain.train.optim import build_optimizer, lr_at, rewarm_factor, set_lr
from smoltrain.train.runlog import RunLog
from smoltrain.train.setup import (
    check_data_budget,
    check_inputs,
    check_prompts,
    cpu_fallback,
    initial_model,
    setup_data,
    with_global_batch,
)
from smoltrain.train.steplog import StepLog, due_work, summary, write_run_files


class Trainer:
    """One training run in one run dir: setup (here and in train.setup), the loop, and the stop glue.

    It is the checkpoint's `train` part: state_dict() holds the loop counters (step, tokens_seen,
    rewarm_from), registered with the checkpointer beside the loader, optimizer, scaler and RNG.
    """

    def __init__(self, cfg: Config, recipe: str | Path | None = None):
        self.cfg = cfg
        device = pick_device(cfg.train.device)
        self.dist = dist_io.setup(cfg.parallel.strategy, device.type)
        if device.type == "cuda" and self.dist.enabled:
            device = torch.device("cuda", self.dist.local_rank)
        self.device = device
        cfg = cpu_fallback(cfg, self.device, self.dist.is_main)  # before anything is written or built
        self.amp_dtype = amp_dtype(self.device, cfg.train.dtype)
        self.cfg = cfg = with_global_batch(cfg, self.dist.world_size)  # a new Config; the caller's is unchanged
        check_inputs(cfg)  # before the run dir is touched or any asset fetched
        check_data_budget(cfg, self.dist.world_size)  # data prepared earlier: its passes are known now
        self.run = RunContext(cfg, self.dist, self.device, self.amp_dtype, self._print)
        self.run_dir = Path(cfg.run.dir)
        self.step = 0
        self.tokens_seen = 0
        self.rewarm_from = None  # the step this run was last extended from (optim.rewarmup_steps ramps from it)
        self.stop = StopRequest()
        self.recipe = recipe  # the --config file: never rewritten, even when it is RUN/config.yaml
        self.layout = open_run_dir(cfg, self.dist, recipe)  # the lock, the mirror, where files live: chosen once
        try:
            self._setup(cfg)
        except BaseException:
            self.close(refused=True)
            raise

    def _setup(self, cfg: Config) -> None:
        torch.manual_seed(cfg.train.seed)
        self.resume = find_resume(cfg, self.layout, self.run.global_batch)  # before data: refused before any work
        self.tokenizer, self.loader, self.val_paths = setup_data(cfg, self.dist, self.layout)
        check_prompts(cfg, self.tokenizer)  # the end of the run samples them: refuse a bad one now
        self._setup_model(self.resume.path)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        states = {"train": self, "loader": self.loader, "optimizer": OptimizerState(self.raw_model, self.optimizer),
                  "scaler": self.scaler, "rng": RNGState()}
        self.checkpointer = Checkpointer(self.run, self.layout, self.raw_model, self.tokenizer, states, self.stop)
        if self.resume.path is not None:
            self._restore(self.resume.path)
        self.tasks = in_loop_tasks(cfg, self.dist, self.val_paths)  # loaded before step 1
        self.log: RunLog | None = None  # opened by train(): a run with nothing to do writes nothing

    def close(self, refused: bool = False) -> None:
        """Release the run dir (the kernel would at exit); a run refused in setup removes what the lock made."""
        self.layout.close(refused)

    def _setup_model(self, ckpt: Path | None) -> None:
        """Weights are loaded before any wrapping; FSDP swaps in sharded parameters, so the optimizer
        is built after the wrap."""
        cfg = self.cfg
        self.raw_model = initial_model(cfg, ckpt, self.device)  # FSDP shards it in place: what we save and sample
        self.model = dist_io.wrap(self.raw_model, self.dist, self.device)
        self.optimizer = build_optimizer(self.raw_model, cfg.optim, self.device)
        if cfg.train.compile:
            self.model = torch.compile(self.model)

    def state_dict(self) -> dict:
        """The loop counters a checkpoint holds (the learning rate is a function of the step)."""
        return {"step": self.step, "tokens_seen": self.tokens_seen, "rewarm_from": self.rewarm_from}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self.rewarm_from = state.get("rewarm_from")

    def _restore(self, ckpt: Path) -> None:
        """Every registered part from the checkpoint; raising max_steps past the saved run's extends it."""
        self.checkpointer.restore(ckpt)
        if self.cfg.train.max_steps > self.resume.saved_max_steps:
            self.rewarm_from = self.step
        if not self.dist.is_main:
            return
        origin = getattr(self.layout.mirror, "restored_from", None)
        remote = f", downloaded from {origin} and verified against its manifest" if origin else ""
        print(f"Resuming from {ckpt} (step {self.step}){remote}", flush=True)
        if self.resume.changes:
            print(f"Settings changed since step {self.step}: " + "; ".join(self.resume.changes)
                  + f" (each segment's settings are kept in {self.run_dir}/config_history.jsonl)", flush=True)

    def train(self) -> int:
        """Train to train.max_steps; 0 when done, 128 + the signal's number when a signal stopped it."""
        try:
            if self.step >= self.cfg.train.max_steps:
                return self._nothing_to_do()
            self._begin()
            try:
                return self._loop()
            finally:
                self._end()
        finally:
            self.close()
            self.stop.leave()

    def _loop(self) -> int:
        cfg = self.cfg
        started = time.perf_counter()
        while self.step < cfg.train.max_steps:
            t0 = time.perf_counter()
            loss, grad_norm, lr = self.train_step()
            self.steplog.step_done(time.perf_counter() - t0)
            fault_point("after_step", self.step)
            if self.step % cfg.log.every == 0 or self.step == cfg.train.max_steps:
                self.steplog.log_step(self.step, self.tokens_seen, loss, grad_norm, lr,
                                      self.loader.tokens_per_source)
            self._maybe_eval_sample_save()
            signum = dist_io.agree_max(self.stop.signum or 0, self.device)  # every rank stops at this step
            if signum:
                return self._stop_on_signal(signum)
        if self.dist.is_main:
            self._print_summary(time.perf_counter() - started)
        return 0

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One optimizer step; (loss, grad norm) stay on the device (no host sync beyond the finite check)."""
        cfg = self.cfg
        lr = lr_at(self.step, cfg.optim, cfg.train.max_steps) * rewarm_factor(self.step, self.rewarm_from,
                                                                               cfg.optim.rewarmup_steps)
        set_lr(self.optimizer, lr, cfg.optim)
        batches = [self.loader.next_batch() for _ in range(cfg.train.grad_accum_steps)]
        num_tokens = sum(int((b[:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        loss = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync:
                loss += self.forward_backward(batch, num_tokens)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), clip)
        loss = dist_io.all_reduce_mean(loss)
        self._check_finite(loss, grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += num_tokens * self.dist.world_size
        return loss, grad_norm, lr  # tensors: read on the host only at log steps

    def forward_backward(self, batch: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Sum of token losses / tokens in the whole step: accumulation averages over tokens, not batches."""
        batch = batch.to(self.device, non_blocking=True)
        x = batch[:, :-1]
        y = batch[:, 1:]
        with self.run.autocast():
            loss = self.model(x, labels=y, loss_chunk=self.cfg.train.loss_chunk, reduction="sum") / num_tokens
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return loss.detach()

    def _check_finite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """The step's one host sync: the guard must hold before the update (a scaler skips bad gradients)."""
        finite = torch.isfinite(loss) if self.scaler is not None else torch.isfinite(loss) & torch.isfinite(grad_norm)
        if bool(finite):
            return
        loss_v = float(loss)
        norm_v = float(grad_norm)
        raise TrainingError(f"Non-finite {'loss' if not math.isfinite(loss_v) else 'gradient norm'} at step "
                            f"{self.step + 1} (loss {loss_v}, grad norm {norm_v}); no update was applied and the "
                            "last good checkpoint is kept. Lower optim.lr or check the data.")

    def _maybe_eval_sample_save(self) -> None:
        """The periodic work, in this order: held-out eval and tasks, samples, save; at the end the save comes
        first, so nothing that fails in the final evaluation or sampling can cost the run its weights. The
        progress bar names each (a final eval can take minutes)."""
        step = self.step
        done = step == self.cfg.train.max_steps
        work = {"eval": lambda: (self.evaluator.evaluate(step), self.evaluator.evaluate_tasks(step)),
                "samples": lambda: self.evaluator.samples(step), "save": self.save}
        due = due_work(self.cfg, step)
        for name in due:
            self.steplog.phase(("final " if done else "") + name)
            work[name]()
        if done and self.layout.mirror is not None:
            self.layout.mirror.run_started(self.run_dir)  # the final records reach the store too
        if due:
            self.steplog.phase("train")

    def save(self) -> Path | None:
        """This step's checkpoint (every rank calls it; rank 0 gets the path)."""
        return self.checkpointer.save()

    def _nothing_to_do(self) -> int:
        if self.dist.is_main:
            print(f"Nothing to do: the run in {self.run_dir} is already at step {self.step} and this config's "
                  f"train.max_steps is {self.cfg.train.max_steps}. Raise train.max_steps to extend it "
                  "(optim.rewarmup_steps re-warms the learning rate).")
        return 0

    def _begin(self) -> None:
        """Rank 0 opens the log and writes the run files; then every rank takes signals and starts the bar."""
        cfg = self.cfg
        if self.dist.is_main:
            self.log = RunLog(self.run_dir, self.step, cfg.log.tensorboard, cfg.log.wandb_project, cfg.to_dict(),
                              cfg.log.trackio_project)
            write_run_files(self.run_dir, cfg, self.device, self.dist.world_size, self.step, self.resume.changes,
                            self.raw_model.num_params(), self.recipe)
            self.checkpointer.check_disk()
            if self.layout.mirror is not None:
                self.layout.mirror.run_started(self.run_dir)
        self.evaluator = InLoopEval(self.run, self.raw_model, self.tokenizer, self.val_paths, self.tasks, self.log)
        self.stop.install()
        self.segment_start = (self.step, self.tokens_seen)
        bar = None
        if self.dist.is_main and cfg.log.progress:
            bar = tqdm(total=cfg.train.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        self.steplog = StepLog(self.run, self.log, bar, self.tokens_seen)

    def _end(self) -> None:
        self.stop.restore()
        self.steplog.close()
        if self.layout.mirror is not None:
            self.layout.mirror.finish()  # the pending upload ends before exit (bounded by checkpoint.remote_timeout)
        if self.log is not None:
            self.log.close()

    def _print_summary(self, seconds: float) -> None:
        """This segment's tokens over this segment's time (an extended run counts from where it resumed)."""
        cfg = self.cfg
        eval_data = self.val_paths[cfg.data.datasets[0].name] if self.val_paths else None
        prompt = (cfg.eval.prompts or ["Hello"])[0]
        start_step, start_tokens = self.segment_start
        self._print(summary(self.run_dir, self.step, self.tokens_seen - start_tokens, seconds, cfg.log.tensorboard,
                            prompt, eval_data, start_step))

    def _print(self, msg: str) -> None:
        if self.dist.is_main:
            tqdm.write(msg)

    def _stop_on_signal(self, signum: int) -> int:
        """Every rank saves the same step (agreed in the loop) and exits; a finished run exits 0."""
        path = self.save()
        if path is not None:
            print(f"\n{signal.Signals(signum).name}: saved {path} (step {self.step}); run the same command to resume.",
                  flush=True)
        return 0 if self.step >= self.cfg.train.max_steps else 128 + signum
