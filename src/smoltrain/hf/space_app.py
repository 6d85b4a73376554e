"""A Gradio app for a small language model, written by `smoltrain export CKPT --space DIR` as DIR/app.py.

It runs on its own: `pip install -r requirements.txt && python app.py` (torch, transformers, gradio and
numba; no smoltrain). The model is the HF folder beside it (`model/`), the page's settings are in `space.json`.
It listens on 127.0.0.1 (this machine only) unless GRADIO_SERVER_NAME says otherwise (Hugging Face Spaces
set it to 0.0.0.0 themselves); GRADIO_SERVER_PORT picks the port (7860). WEIGHTS=int8 decodes from 8-bit
weights (weight-only, a scale and a minimum per block of 32 inputs, a numba kernel: int8_linear.py beside
this file, the same file `smoltrain generate --weights int8` runs); WEIGHTS=fp32 from the fp32 weights; the
default is space.json's.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

import gradio as gr
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # int8_linear.py, beside this file (also when this file is imported from elsewhere)
from int8_linear import Int8Linear  # noqa: E402  (smoltrain's own 8-bit layer, copied here by the export)

SETTINGS = json.loads((HERE / "space.json").read_text(encoding="utf-8"))


def to_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Every bias-free Linear (the projections and the LM head) as int8; the embedding lookup stays fp32."""
    for module in list(model.modules()):
        for child, linear in list(module.named_children()):
            if isinstance(linear, torch.nn.Linear) and linear.bias is None:
                setattr(module, child, Int8Linear.of(linear.weight))
    return model


def load(weights: str):
    """(model, tokenizer) from ./model, fp32 or int8 (int8 only on the CPU)."""
    tok = AutoTokenizer.from_pretrained(HERE / "model")
    model = AutoModelForCausalLM.from_pretrained(HERE / "model", dtype=torch.float32).eval()
    if weights == "int8":
        model = to_int8(model)
        with torch.inference_mode():
            for tokens in (1, 2):  # compiles both loops (a token; a prompt) now, not in the first request
                model(torch.zeros(1, tokens, dtype=torch.long))
    return model, tok


def make_generate(model, tok):
    """The page's action: stream the prompt and its continuation as it grows."""

    def generate(prompt: str, max_new_tokens: float, temperature: float, top_k: float, top_p: float, seed: float):
        if not prompt:
            raise gr.Error("Type a prompt first.")
        ids = tok(prompt, return_tensors="pt").input_ids
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        sample = float(temperature) > 0
        options = {"temperature": float(temperature), "top_k": int(top_k), "top_p": float(top_p)} if sample else {}
        if sample and seed is not None:
            torch.manual_seed(int(seed))
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=int(max_new_tokens),
                      do_sample=sample, streamer=streamer, pad_token_id=tok.eos_token_id, **options)
        thread = threading.Thread(target=torch.inference_mode()(model.generate), kwargs=kwargs, daemon=True)
        thread.start()
        text = prompt
        for piece in streamer:
            text += piece
            yield text
        thread.join()

    return generate


def build(model, tok, weights: str) -> gr.Blocks:
    generate = make_generate(model, tok)
    with gr.Blocks(title=SETTINGS["title"], analytics_enabled=False) as app:
        gr.Markdown(f"## {SETTINGS['title']}\n{SETTINGS['description']} ({weights} weights)")
        prompt = gr.Textbox(label="Prompt", lines=3, placeholder=(SETTINGS["examples"] or ["Once upon a time"])[0])
        with gr.Row():
            max_new = gr.Slider(1, 512, value=SETTINGS["max_new_tokens"], step=1, label="max new tokens")
            temperature = gr.Slider(0.0, 2.0, value=0.8, step=0.05, label="temperature (0 = greedy)")
            top_k = gr.Slider(0, 200, value=50, step=1, label="top-k (0 = off)")
            top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.01, label="top-p (1 = off)")
            seed = gr.Number(value=0, precision=0, label="seed (empty = random)")
        button = gr.Button("Generate", variant="primary")
        output = gr.Textbox(label="Output", lines=12)
        if SETTINGS["examples"]:
            gr.Examples([[p] for p in SETTINGS["examples"]], inputs=[prompt])
        inputs = [prompt, max_new, temperature, top_k, top_p, seed]
        gr.on([button.click, prompt.submit], generate, inputs, output, api_name="generate", concurrency_limit=1)
    return app


def main() -> None:
    """Serve the page. Settings come from the environment (gradio's own variables, and WEIGHTS), so the same
    file runs on a Space and on a laptop unchanged."""
    host = os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")  # loopback unless told otherwise
    port = int(os.environ.get("GRADIO_SERVER_PORT", "7860"))
    weights = os.environ.get("WEIGHTS", SETTINGS["weights"])
    if weights not in ("int8", "fp32"):
        raise SystemExit(f"WEIGHTS must be int8 or fp32, not {weights!r}.")
    model, tok = load(weights)
    build(model, tok, weights).queue().launch(server_name=host, server_port=port, share=False, ssr_mode=False)


if __name__ == "__main__":
    main()
