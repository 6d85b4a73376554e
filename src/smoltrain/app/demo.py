"""`smoltrain demo CKPT_OR_RUN`: a local Gradio page to prompt a model and compare checkpoints side by side.

Two output panes each pick a checkpoint of the run; one click streams both continuations at once, with
the same sampling settings and seed, so what differs is the training step. It binds to 127.0.0.1 unless
told otherwise: a demo is a development tool, not a server to expose. Every input is checked (paths,
port) before Gradio is imported, so mistakes fail in a second with exit code 2.
"""

from __future__ import annotations

import os
import socket
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml

from smoltrain.checkpoint.discovery import STEP_DIR, list_checkpoints, resolve_checkpoint, step_of
from smoltrain.device import amp_dtype
from smoltrain.errors import UserError
from smoltrain.hf.interop import load_model
from smoltrain.history import History
from smoltrain.model.generate import SamplingConfig, decode_weights, generate, prepare_for_decode, stream_text

PANES = ("A", "B")
SAMPLING = SamplingConfig()  # the shared defaults (generate and in-training samples start from them too)


class CheckpointSource:
    """The checkpoints a user can pick: a run's (listed afresh on each call: training may go on), or one."""

    def __init__(self, path: str | Path):
        p = Path(path).expanduser()
        if not p.exists():
            raise UserError(f"{p} does not exist.")
        self.run_dir: Path | None = None
        self.single: Path | None = None
        if (p / "checkpoints").is_dir() or (p / "metrics.jsonl").exists():
            self.run_dir = p
            self.default = None
            if not list_checkpoints(p):
                raise UserError(f"Run directory {p} has no checkpoints yet; the demo needs one. Train until the "
                                "first save (checkpoint.every), or pass a checkpoint or HF directory.")
        elif p.parent.name == "checkpoints" and STEP_DIR.match(p.name):  # one checkpoint of a run: offer all
            self.run_dir = p.parent.parent
            self.default = resolve_checkpoint(p).name
        else:
            self.single = resolve_checkpoint(p)  # a clear UserError for anything that is not a model
            self.default = self.single.name

    @property
    def name(self) -> str:
        return str(self.run_dir or self.single)

    def options(self) -> list[tuple[str, str]]:
        """(label, key) pairs, oldest first; a label shows the step and its val loss when logged."""
        if self.single is not None:
            return [(self.single.name, self.single.name)]
        history = History.load(self.run_dir)
        opts = []
        for ckpt in list_checkpoints(self.run_dir):
            step = step_of(ckpt)
            val = (history.val_at(step) or {}).get("val_loss")
            opts.append((f"step {step}" + (f" (val loss {val:.3f})" if val is not None else ""), ckpt.name))
        return opts

    def path(self, key: str) -> Path:
        """The directory for a picked key; only listed checkpoints resolve (never an arbitrary path)."""
        if self.single is not None and key == self.single.name:
            return self.single
        if self.run_dir is not None and key in {k for _, k in self.options()}:
            return self.run_dir / "checkpoints" / key
        raise UserError(f"Checkpoint {key!r} is not (or no longer) in {self.name}; reload the page.")

    def placeholder(self) -> str:
        """The prompt box's hint: the run's first eval.prompts entry (its config.yaml, or the checkpoint's),
        so a Shakespeare model suggests "ROMEO:"; a generic one for a model without a run config."""
        for where in (self.run_dir, self.single):
            try:
                prompts = (yaml.safe_load((where / "config.yaml").read_text()).get("eval") or {}).get("prompts")
            except (OSError, TypeError, AttributeError, yaml.YAMLError):
                continue
            if prompts and isinstance(prompts[0], str) and prompts[0].strip():
                return prompts[0]
        return "Once upon a time"

    def defaults(self) -> tuple[str, str]:
        """Keys shown first: the oldest and the newest checkpoint (or the one asked for)."""
        keys = [k for _, k in self.options()]
        if not keys:
            raise UserError(f"{self.name} has no checkpoints left; reload the page once one is saved.")
        return keys[0], self.default if self.default in keys else keys[-1]


class ModelCache:
    """Loaded models by directory, the least recently used dropped beyond `size` (two panes: two), prepared
    for decoding with `weights` ("auto" is int8 on a CPU: see generate.WEIGHTS)."""

    def __init__(self, device: torch.device, size: int = 2, weights: str = "auto"):
        self.device = device
        self.size = size
        self.dtype = amp_dtype(device)
        self.weights = decode_weights(weights, device)
        self.models: OrderedDict[str, tuple] = OrderedDict()
        self.lock = threading.Lock()  # requests load from several threads; a model is only read once loaded

    def get(self, path: Path) -> tuple:
        key = str(path)
        with self.lock:
            if key not in self.models:
                model, tok, _ = load_model(path, device=self.device, dtype=self.dtype)
                self.models[key] = (prepare_for_decode(model, self.weights), tok)
                while len(self.models) > self.size:
                    self.models.popitem(last=False)
            self.models.move_to_end(key)
            return self.models[key]


def interleave(streams: list[Iterator[str]]) -> Iterator[list[str]]:
    """Advance every text stream by one piece per round; yield all texts so far after each round."""
    texts = [""] * len(streams)
    active = list(range(len(streams)))
    while active:
        grew = False
        for i in list(active):
            try:
                texts[i] += next(streams[i])
                grew = True
            except StopIteration:
                active.remove(i)
        if grew:
            yield list(texts)


class Generator:
    """The page's one action: stream a prompt's continuation from each picked checkpoint.

    Each stream owns its KV cache (generate() makes one per call), so two panes on the same checkpoint,
    or two requests at once, never touch each other's state: each equals the stream it would be alone."""

    def __init__(self, source: CheckpointSource, cache: ModelCache):
        self.source = source
        self.cache = cache

    def __call__(self, prompt: str, key_a: str, key_b: str, max_new_tokens: float, temperature: float,
                 top_k: float, top_p: float, seed: float | None) -> Iterator[tuple[str, str]]:
        if not prompt:
            raise UserError("Type a prompt first.")
        cfg = SamplingConfig(float(temperature), int(top_k or 0), float(top_p))
        cfg.validate()
        seed = None if seed is None else int(seed)
        models = [self.cache.get(self.source.path(k)) for k in (key_a, key_b)]
        token_streams = [generate(m, tok.encode(prompt), int(max_new_tokens), cfg, seed, [tok.eot_id])
                         for m, tok in models]
        try:
            texts = [stream_text(t, tok.decode) for t, (_, tok) in zip(token_streams, models)]
            for a, b in interleave(texts):
                yield prompt + a, prompt + b
        finally:
            for t in token_streams:
                t.close()  # ends the decode (its cache and thread setting) when the page stops listening


def build_app(source: CheckpointSource, cache: ModelCache):
    """The Gradio Blocks page: prompt, sampling controls, and two (picker, output) panes."""
    import gradio as gr

    run = Generator(source, cache)

    def on_generate(*args):
        try:
            yield from run(*args)
        except UserError as e:
            raise gr.Error(str(e)) from None

    def refresh():  # a page load lists the run's checkpoints again: training may have saved new ones
        a, b = source.defaults()
        return gr.Dropdown(choices=source.options(), value=a), gr.Dropdown(choices=source.options(), value=b)

    first, last = source.defaults()
    context = cache.get(source.path(last))[0].config.max_position_embeddings
    with gr.Blocks(title="smoltrain demo", analytics_enabled=False) as app:
        gr.Markdown(f"## smoltrain demo\n`{source.name}` ({cache.weights} weights): pick a checkpoint for each "
                    "pane, type a prompt, and "
                    "generate. Both panes use the same settings and seed, so what differs is the checkpoint.")
        prompt = gr.Textbox(label="Prompt", lines=3, elem_id="prompt", placeholder=source.placeholder())
        with gr.Row():
            max_new = gr.Slider(1, min(2048, context), value=min(64, context), step=1, label="max new tokens")
            temperature = gr.Slider(0.0, 2.0, value=SAMPLING.temperature, step=0.05, label="temperature (0 = greedy)")
            top_k = gr.Slider(0, 200, value=SAMPLING.top_k, step=1, label="top-k (0 = off)")
            top_p = gr.Slider(0.05, 1.0, value=SAMPLING.top_p, step=0.01, label="top-p (1 = off)")
            seed = gr.Number(value=0, precision=0, label="seed (empty = random)")
        button = gr.Button("Generate", variant="primary", elem_id="generate")
        pickers = []
        outputs = []
        with gr.Row():
            for pane, key in zip(PANES, (first, last)):
                with gr.Column():
                    pickers.append(gr.Dropdown(choices=source.options(), value=key, label=f"checkpoint {pane}",
                                               allow_custom_value=True, elem_id=f"pick-{pane.lower()}"))
                    outputs.append(gr.Textbox(label=f"output {pane}", lines=12, max_lines=12, autoscroll=True,
                                              elem_id=f"out-{pane.lower()}"))  # fixed height: panes stay equal
        inputs = [prompt, *pickers, max_new, temperature, top_k, top_p, seed]
        gr.on([button.click, prompt.submit], on_generate, inputs, outputs, api_name="generate", concurrency_limit=1)
        app.load(refresh, None, pickers, api_visibility="private")
    return app


def check_port(host: str, port: int) -> None:
    """Fail with a clear message when host:port cannot be listened on (in use, or not this machine's);
    the port's range was checked by argparse."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise UserError(f"--host {host!r} cannot be resolved ({e.strerror}).") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: ignore TIME_WAIT
        try:
            s.bind(addr)
        except OSError as e:
            raise UserError(f"Cannot listen on {host}:{port} ({e.strerror}); another program (an earlier demo?) "
                            "may be using the port. Pick another with --port.") from None


def serve(source: CheckpointSource, cache: ModelCache, host: str, port: int) -> int:
    """Build the page and serve it until Ctrl+C; Gradio is imported only now (after every check)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    app = build_app(source, cache)
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    print(f"smoltrain demo of {source.name} on http://{host}:{port} (Ctrl+C stops it)", flush=True)
    try:
        app.queue().launch(server_name=host, server_port=port, share=False, inbrowser=False, ssr_mode=False,
                           theme=theme, footer_links=[], quiet=True)  # quiet: our line above says where it is
    except OSError as e:  # the port was taken between the check and the start
        raise UserError(f"Cannot start the demo on {host}:{port}: {e}. Pick another --port.") from None
    return 0
