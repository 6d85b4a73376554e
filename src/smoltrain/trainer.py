"""The training loop: Trainer.train() -> train_step() -> forward_backward().

Every stateful part (model, optimizer, loader, RNG, loop counters) is saved in each checkpoint and
restored on resume, so a killed run continues bit-identically on CPU. The learning rate is a pure
function of the step (optim.lr_at), so it needs no state.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from smoltrain import checkpoint as ckpt_io
from smoltrain import distributed as dist_io
from smoltrain import interop
from smoltrain.config import Config
from smoltrain.errors import TrainingError, UserError
from smoltrain.evaluate import TokenTables, evaluate_datasets, val_record
from smoltrain.generate import SamplingConfig, generate, pick_device
from smoltrain.metrics import RunLog, memory_gb, model_flops_utilization
from smoltrain.model import IGNORE_INDEX, build_model
from smoltrain.optim import build_optimizer, lr_at, rewarm_factor, set_lr
from smoltrain.pipeline import missing_inputs
from smoltrain.remote import RunMirror
from smoltrain.resume import pick_resume
from smoltrain.rundir import own_run_dir, record_segment
from smoltrain.runinfo import environment, fault_point, print_header
from smoltrain.stopping import StopRequest
from smoltrain.storage import newest_valid, tree_size
from smoltrain.tokenizer import TOKENIZER_FILES

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.device = pick_device(cfg.train.device)
        self.dist = dist_io.setup(cfg.parallel.strategy, self.device.type)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
        name = cfg.train.dtype if cfg.train.dtype != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        self.amp_dtype = DTYPES[name]
        self._apply_global_batch()
        if not cfg.data.datasets:  # before the run dir is touched or any asset fetched
            raise UserError("The config has no data.datasets (e.g. --config configs/quickstart.yaml).")
        missing = missing_inputs(cfg)
        if missing:
            raise UserError("The config names inputs that are not there: " + "; ".join(missing) + ".")
        self.run_dir = Path(cfg.run.dir)
        self.step, self.tokens_seen, self.saved_step, self.resume_changes = 0, 0, None, []
        self.checkpoint_bytes: int | None = None
        self.rewarm_from = None  # the step this run was last extended from (optim.rewarmup_steps ramps from it)
        self.stop = StopRequest()
        self.lock = own_run_dir(self.run_dir, self.dist.world_size)
        try:
            self._setup(cfg)
        except BaseException:
            self.close()
            raise

    def _setup(self, cfg: Config) -> None:
        torch.manual_seed(cfg.train.seed)
        self.mirror = RunMirror.from_config(cfg) if self.dist.is_main else None  # checked before any work
        self._setup_data()
        ckpt = self._find_resume()
        self._setup_model(ckpt)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        if ckpt is not None:
            self._restore(ckpt)
        self.tasks = []  # eval.tasks: rank 0 scores them (FSDP shards the weights, so not there)
        if self.dist.is_main and self.dist.strategy != "fsdp" and cfg.eval.tasks:
            from smoltrain.pipeline import load_eval_tasks

            self.tasks = load_eval_tasks(cfg, self.val_paths)
        self.log = None  # opened by train(): a run with nothing to do writes nothing

    def close(self) -> None:
        """Release the run dir (the kernel would at exit; in-process callers get it back now)."""
        if self.lock is not None:
            self.lock.release()

    # --- setup -------------------------------------------------------------------------------------
    def _apply_global_batch(self) -> None:
        """train.global_batch_size fixes the batch across world sizes: accumulation makes up the rest."""
        t, world = self.cfg.train, self.dist.world_size
        if t.global_batch_size is None:
            return
        per_step = t.micro_batch_size * world
        if t.global_batch_size % per_step:
            raise UserError(f"train.global_batch_size {t.global_batch_size} is not divisible by micro_batch_size "
                            f"{t.micro_batch_size} x world size {world} = {per_step}; change one of them.")
        t.grad_accum_steps = t.global_batch_size // per_step

    def _setup_data(self) -> None:
        from smoltrain.data.loader import PackedLoader
        from smoltrain.pipeline import prepare_datasets, resolve_tokenizer

        cfg, main = self.cfg, self.dist.is_main
        if cfg.data.streaming:
            return self._setup_stream()
        if main:
            self.tokenizer = resolve_tokenizer(cfg, verbose=True)
            paths = prepare_datasets(cfg, self.tokenizer, verbose=True)
        dist_io.barrier()
        if not main:
            self.tokenizer = resolve_tokenizer(cfg, verbose=False)
            paths = prepare_datasets(cfg, self.tokenizer, verbose=False)
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise UserError(f"The tokenizer has {self.tokenizer.vocab_size} tokens but model.vocab_size is "
                            f"{cfg.model.vocab_size}; raise model.vocab_size or use a smaller tokenizer.")
        trained = {d.name: d.weight for d in cfg.data.datasets if not d.eval_only(cfg.data.val_fraction)}
        common = dict(batch_size=cfg.train.micro_batch_size, seq_len=cfg.train.seq_len, seed=cfg.train.seed,
                      rank=self.dist.rank, world_size=self.dist.world_size, grad_accum_steps=cfg.train.grad_accum_steps)
        stages = cfg.to_dict()["data"]["stages"]  # plain dicts, as the loader takes them
        self.loader = PackedLoader({n: paths[n] for n in trained}, split="train", weights=trained,
                                   stages=stages or None, **common)
        self.val_paths = paths  # every dataset's held-out split, evaluation-only datasets included
        self.token_tables = TokenTables(self.tokenizer).to(self.device)

    def _setup_stream(self) -> None:
        """data.streaming: tokenize and pack one source on the fly; no prepare step, no held-out split."""
        from smoltrain.data.stream import StreamLoader
        from smoltrain.pipeline import resolve_asset, resolve_tokenizer

        cfg = self.cfg
        if len(cfg.data.datasets) != 1 or len(cfg.data.datasets[0].sources) != 1:
            raise UserError("data.streaming trains from exactly one dataset with one source; prepare the data "
                            "(data.streaming: false) to mix several.")
        ds, main = cfg.data.datasets[0], self.dist.is_main
        if main:  # rank 0 fetches assets and trains the tokenizer; the others then read them
            self.tokenizer, source = resolve_tokenizer(cfg, verbose=True), resolve_asset(ds.sources[0])
        dist_io.barrier()
        if not main:
            self.tokenizer, source = resolve_tokenizer(cfg, verbose=False), resolve_asset(ds.sources[0])
        self.loader = StreamLoader(source, self.tokenizer, cfg.train.micro_batch_size,
                                   cfg.train.seq_len, text_key=cfg.data.text_key, rank=self.dist.rank,
                                   world_size=self.dist.world_size, name=ds.name)
        self.val_paths = None  # a stream has no held-out split: evaluations are skipped

    def _setup_model(self, ckpt: Path | None) -> None:
        """Weights (fresh, init_from, or the resume checkpoint's) are loaded before any wrapping."""
        cfg = self.cfg
        source = ckpt or cfg.train.init_from
        if source:  # a resume checkpoint was verified by _find_resume; init_from is resolved here
            load = interop.load_resolved if ckpt else interop.load_model
            model, _, src = load(source, device=self.device, need_tokenizer=False)
            if model.config != cfg.model:
                raise UserError(f"{'train.init_from ' if ckpt is None else 'The checkpoint '}{src} has another "
                                f"shape than the config's model section; set model to match it: {model.config}")
            self.model = model.train()
        else:
            self.model = build_model(cfg.model, self.device).train()
        self.model.gradient_checkpointing = cfg.train.activation_checkpointing
        self.raw_model = self.model  # unwrapped: what we save and sample from
        self.model = dist_io.wrap(self.model, self.dist, self.device)  # FSDP swaps in sharded parameters...
        self.optimizer = build_optimizer(self.raw_model, cfg.optim, self.device)  # ...so the optimizer comes after
        if cfg.train.compile:
            self.model = torch.compile(self.model)

    def _find_resume(self) -> Path | None:
        """Rank 0 picks the checkpoint (quarantining corrupt ones) and checks it fits; all ranks use it."""
        found, self.resume_changes = dist_io.on_main(
            lambda: pick_resume(self.cfg, self.run_dir, self.global_batch, self.mirror))
        return found

    def _restore(self, ckpt: Path) -> None:
        """Optimizer (resharded to this world size), scaler, loop counters, loader position and RNG."""
        state = ckpt_io.load_train_state(ckpt)
        ckpt_io.load_optimizer(ckpt, self.raw_model, self.optimizer)
        if self.scaler is not None and state["extra"].get("scaler"):
            self.scaler.load_state_dict(state["extra"]["scaler"])
        ts = state["train_state"]
        self.step, self.tokens_seen = ts["step"], ts["tokens_seen"]
        saved_max = (yaml.safe_load(state["config_yaml"]).get("train") or {}).get("max_steps", self.step)
        # raising max_steps past the saved run's starts an extension here; otherwise keep the saved one
        self.rewarm_from = self.step if self.cfg.train.max_steps > saved_max else ts.get("rewarm_from")
        loader = ts["loader"]
        if "per_rank" in loader:
            if len(loader["per_rank"]) != self.dist.world_size:
                raise UserError("A streaming run resumes only at the world size it was saved with "
                                f"({len(loader['per_rank'])} processes).")
            loader = loader["per_rank"][self.dist.rank]
        self.loader.load_state_dict(loader)
        ckpt_io.set_rng_state(*state["rng"])
        self.saved_step = self.step  # that checkpoint exists: a stop before the next step saves nothing
        if self.dist.is_main:
            origin = getattr(self.mirror, "restored_from", None)
            remote = f", downloaded from {origin} and verified against its manifest" if origin else ""
            print(f"Resuming from {ckpt} (step {self.step}){remote}", flush=True)
            if self.resume_changes:
                print(f"Settings changed since step {self.step}: " + "; ".join(self.resume_changes)
                      + f" (each segment's settings are kept in {self.run_dir}/config_history.jsonl)", flush=True)

    @property
    def global_batch(self) -> int:
        t = self.cfg.train
        return t.micro_batch_size * t.grad_accum_steps * self.dist.world_size

    # --- the loop ----------------------------------------------------------------------------------
    def train(self) -> int:
        try:
            return self._train()
        finally:
            self.close()

    def _train(self) -> int:
        cfg, main = self.cfg, self.dist.is_main
        if self.step >= cfg.train.max_steps:
            if main:
                print(f"Nothing to do: the run in {self.run_dir} is already at step {self.step} and this config's "
                      f"train.max_steps is {cfg.train.max_steps}. Raise train.max_steps to extend it "
                      "(optim.rewarmup_steps re-warms the learning rate).")
            return 0
        if main:
            self.log = RunLog(self.run_dir, self.step, cfg.log.tensorboard, cfg.log.wandb_project, cfg.to_dict(),
                              cfg.log.trackio_project)
            self._write_run_files()
            self._check_disk()
            if self.mirror is not None:
                self.mirror.run_started(self.run_dir)
        self.stop.install()
        bar = self._progress_bar()
        busy, last_tokens = 0.0, self.tokens_seen  # time in train_step only: eval and saves excluded
        started = time.perf_counter()
        try:
            while self.step < cfg.train.max_steps:
                t0 = time.perf_counter()
                loss, grad_norm, lr = self.train_step()
                busy += time.perf_counter() - t0
                if bar is not None:
                    bar.update(1)
                fault_point("after_step", self.step)
                if self.step % cfg.log.every == 0 or self.step == cfg.train.max_steps:
                    self._log_step(loss, grad_norm, lr, (self.tokens_seen - last_tokens) / max(busy, 1e-9), bar)
                    busy, last_tokens = 0.0, self.tokens_seen
                self._maybe_eval_sample_save()
                signum = dist_io.agree_max(self.stop.signum or 0, self.device)  # every rank stops at this step
                if signum:
                    return self._stop_on_signal(signum)
            self._print_summary(time.perf_counter() - started)
        finally:
            self.stop.restore()
            if bar is not None:
                bar.close()
            if self.mirror is not None:
                self.mirror.finish()  # the pending upload ends before exit (bounded by checkpoint.remote_timeout)
            if self.log is not None:
                self.log.close()
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
        finite = torch.isfinite(loss) if self.scaler is not None else torch.isfinite(loss) & torch.isfinite(grad_norm)
        if not bool(finite):  # the step's one host sync: the guard must hold before the update
            loss_v, norm_v = float(loss), float(grad_norm)
            raise TrainingError(f"Non-finite {'loss' if not math.isfinite(loss_v) else 'gradient norm'} at step "
                                f"{self.step + 1} (loss {loss_v}, grad norm {norm_v}); no update was applied and the "
                                "last good checkpoint is kept. Lower optim.lr or check the data.")
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
        x, y = batch[:, :-1], batch[:, 1:]
        with self._autocast():
            loss = self.model(x, labels=y, loss_chunk=self.cfg.train.loss_chunk, reduction="sum") / num_tokens
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return loss.detach()

    def _autocast(self):
        if self.amp_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # --- periodic work -----------------------------------------------------------------------------
    def _maybe_eval_sample_save(self) -> None:
        cfg, step, done = self.cfg, self.step, self.step == self.cfg.train.max_steps
        if done or (cfg.eval.every and step % cfg.eval.every == 0):
            self.evaluate()
            self.evaluate_tasks()
        if cfg.eval.prompts and (done or (cfg.eval.sample_every and step % cfg.eval.sample_every == 0)):
            self.samples()
        if done or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
            self.save()

    def evaluate(self) -> dict | None:
        """Every dataset's whole held-out split (or eval.max_tokens of it), as `smoltrain eval` computes it."""
        if self.val_paths is None:
            return None
        cfg = self.cfg
        self.raw_model.eval()
        fwd = lambda x, y: self.raw_model(x, labels=y, loss_chunk=cfg.train.loss_chunk, reduction="none")  # noqa: E731
        results = evaluate_datasets(fwd, self.val_paths, "val", cfg.train.seq_len, cfg.train.micro_batch_size,
                                    cfg.eval.max_tokens, self.device, self.token_tables, self._autocast)
        self.raw_model.train()
        if not results:
            return None
        rec = val_record(self.step, results)
        if self.log is not None:
            self.log.log(rec)
            bpb = f", {rec['val_bpb']:.3f} bits/byte" if rec["val_bpb"] else ""
            each = "".join(f"; {n} {r['loss']:.4f}" for n, r in results.items()) if len(results) > 1 else ""
            self._print(f"step {self.step}: val loss {rec['val_loss']:.4f} (ppl {rec['val_ppl']:.2f}{bpb}{each})")
        return rec

    def evaluate_tasks(self) -> None:
        from smoltrain.tasks import score_in_loop

        if self.tasks:
            scores = score_in_loop(self.raw_model, self.tokenizer, self.tasks, self.device, self._autocast)
            self.raw_model.train()
            self.log.log({"step": self.step, **scores})
            self._print(f"step {self.step}: " + ", ".join(f"{k[5:]} {v:.3f}" for k, v in scores.items()))

    def samples(self) -> None:
        if not self.dist.is_main or self.dist.strategy == "fsdp":
            return
        ev = self.cfg.eval
        self.raw_model.eval()
        sampled = SamplingConfig(ev.temperature, ev.top_k, ev.top_p)
        for prompt in ev.prompts:
            for mode, sc in (("greedy", SamplingConfig(0)), ("sampled", sampled)):
                ids = generate(self.raw_model, self.tokenizer.encode(prompt), ev.sample_tokens, sc,
                               seed=self.cfg.train.seed + self.step, stop_ids=[self.tokenizer.eot_id])
                text = self.tokenizer.decode(list(ids))
                self.log.sample({"step": self.step, "mode": mode, "prompt": prompt, "text": text})
                self._print(f"[step {self.step} {mode}] {prompt}{text}")
        self.log.samples_done(self.step)
        self.raw_model.train()

    def save(self) -> Path | None:
        """Save this step once: a stop right after a scheduled save (or a resume) has nothing to add."""
        if self.saved_step == self.step:
            return ckpt_io.step_dir(self.run_dir, self.step) if self.dist.is_main else None
        with self.stop.saving(self.step):  # a signal meanwhile is acted on after the commit
            path = self._write_checkpoint()
        self.saved_step = self.step
        return path

    def _write_checkpoint(self) -> Path | None:
        """Every rank takes part in gathering weights and optimizer state; rank 0 writes them and commits."""
        cfg, main = self.cfg, self.dist.is_main
        staging = [None]
        if main:
            self._check_disk()
            staging[0] = ckpt_io.begin_train_checkpoint(self.run_dir, self.step)
        if self.dist.world_size > 1:  # the staging name is private to rank 0's process: tell the others
            torch.distributed.broadcast_object_list(staging, src=0)
        staging = staging[0]
        path = None
        with ckpt_io.discard_on_error(staging if main else None):  # a full disk leaves no staging behind
            weights = dist_io.full_state_dict(self.raw_model, self.dist)  # collective under FSDP
            loader_state = self._loader_state()  # collective for streams (per-rank positions)
            ckpt_io.save_optimizer(staging, self.raw_model, self.optimizer, main)  # collective under FSDP
            dist_io.barrier()
            if main:
                state = {"step": self.step, "tokens_seen": self.tokens_seen, "global_batch": self.global_batch,
                         "world_size": self.dist.world_size, "loader": loader_state,
                         "rewarm_from": self.rewarm_from, "env": environment(self.device, self.dist.world_size)}
                extra = {"scaler": self.scaler.state_dict() if self.scaler else None}
                path = ckpt_io.finish_train_checkpoint(staging, self.run_dir, self.step, self.raw_model.config,
                                                       weights, self.tokenizer, cfg.to_yaml(), extra, state,
                                                       export_hf=cfg.checkpoint.export_hf)
        if main:
            self.checkpoint_bytes = tree_size(path)  # the real size, for the next free-space check
            if self.mirror is not None:  # before retention: a checkpoint being uploaded is never the one deleted
                self.mirror.checkpoint_saved(path, self.step, self.run_dir)
            ckpt_io.retain(self.run_dir, cfg.checkpoint.keep_last)
        dist_io.barrier()
        return path

    def _loader_state(self) -> dict:
        """A packed loader's state is the same on every rank; a stream's position is per rank."""
        state = self.loader.state_dict()
        if not self.cfg.data.streaming or self.dist.world_size == 1:
            return state
        states = [None] * self.dist.world_size
        torch.distributed.all_gather_object(states, state)
        return {"per_rank": states}

    # --- plumbing ----------------------------------------------------------------------------------
    def _log_step(self, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float, tokens_per_sec: float, bar) -> None:
        if self.log is None:
            return
        loss, grad_norm = float(loss), float(grad_norm)
        mfu = model_flops_utilization(self.cfg.model, self.cfg.train.seq_len, tokens_per_sec, self.device,
                                      self.amp_dtype, self.dist.world_size)
        rec = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_sec": tokens_per_sec,
               "mfu": mfu, "tokens": self.tokens_seen, "mem_gb": memory_gb(self.device),
               "tokens_per_source": self.loader.tokens_per_source}
        self.log.log(rec)
        msg = f"loss {loss:.4f} lr {lr:.2e} {tokens_per_sec:,.0f} tok/s" + (f" mfu {mfu:.1%}" if mfu else "")
        if bar is not None:
            bar.set_postfix_str(msg)
        else:
            print(f"step {self.step}/{self.cfg.train.max_steps} {msg}", flush=True)

    def _print_summary(self, seconds: float) -> None:
        """Where everything is, the final held-out scores, and what to run next."""
        if not self.dist.is_main:
            return
        from smoltrain.history import History

        run, val = self.run_dir, History.load(self.run_dir).last(evals=True) or {}
        newest = newest_valid(run)
        lines = [f"\nDone: step {self.step}, {self.tokens_seen:,} tokens in {seconds / 60:.1f} min."]
        if isinstance(val.get("val_loss"), float):
            bpb = f", {val['val_bpb']:.3f} bits per byte" if isinstance(val.get("val_bpb"), float) else ""
            lines.append(f"Held-out (step {val['step']}): loss {val['val_loss']:.4f}{bpb}.")
        lines += [f"  checkpoint   {newest}", f"  metrics      {run / 'metrics.jsonl'}",
                  f"  samples      {run / 'samples.jsonl'}"]
        if self.cfg.log.tensorboard:
            lines.append(f"  tensorboard  tensorboard --logdir {run / 'tb'}")
        lines += ["Next:", f"  smoltrain generate {run} --prompt \"{(self.cfg.eval.prompts or ['Hello'])[0]}\"",
                  f"  smoltrain eval {run} --data {self.val_paths[self.cfg.data.datasets[0].name]}"
                  if self.val_paths else f"  smoltrain eval {run} --data DIR",
                  f"  smoltrain export {run} --out hf/{run.name}",
                  f"  smoltrain report {run} --out report/{run.name}",
                  f"  smoltrain demo {run}"]
        self._print("\n".join(lines))

    def _print(self, msg: str) -> None:
        if self.dist.is_main:
            tqdm.write(msg)

    def _progress_bar(self):
        if not (self.dist.is_main and self.cfg.log.progress):
            return None
        return tqdm(total=self.cfg.train.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)

    def _write_run_files(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(self.cfg.to_yaml())
        env = environment(self.device, self.dist.world_size)
        (self.run_dir / "env.json").write_text(json.dumps(env, indent=2))
        record_segment(self.run_dir, self.step, self.cfg.to_dict(), self.resume_changes)
        print_header(self.cfg, env, self.raw_model.num_params(), self.dist.world_size)

    def _check_disk(self) -> None:
        """The next checkpoint's size: measured from the last one written, estimated before the first."""
        ck = self.cfg.checkpoint
        if self.checkpoint_bytes is None:
            tok_files = [self.tokenizer.directory / n for n in TOKENIZER_FILES]
            shapes = {name: p.numel() for name, p in self.raw_model.named_parameters()}  # a tied weight once
            self.checkpoint_bytes = ckpt_io.checkpoint_bytes(shapes, ck.export_hf,
                                                             sum(p.stat().st_size for p in tok_files if p.exists()))
        ckpt_io.check_free_space(self.run_dir, self.checkpoint_bytes, ck.min_free_gb)

    def _stop_on_signal(self, signum: int) -> int:
        """Every rank saves the same step (agreed in the loop) and exits; a finished run exits 0."""
        path = self.save()
        if path is not None:
            print(f"\n{signal.Signals(signum).name}: saved {path} (step {self.step}); run the same command to resume.",
                  flush=True)
        return 0 if self.step >= self.cfg.train.max_steps else 128 + signum


def train_cli(a) -> int:
    from smoltrain.config import load_config

    cfg = load_config(a.config, a.set)
    try:
        return Trainer(cfg).train()
    finally:
        dist_io.teardown()
