"""Commands on models: assets, import, export (and --push-to-hub), generate."""

from __future__ import annotations

import argparse
import sys

from smoltrain import domain
from smoltrain.checkpoint.discovery import check_model_path
from smoltrain.cli.args import DEVICE, POSITIVE, out_dir, out_path, ranged
from smoltrain.errors import UserError
from smoltrain.model.config import SamplingConfig

SAMPLING = SamplingConfig()  # the shared defaults: generate, demo and in-training samples (README)


def _cmd_assets(a: argparse.Namespace) -> int:
    from smoltrain.data.assets import fetch_assets

    paths = fetch_assets(a.dir)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _cmd_import(a: argparse.Namespace) -> int:
    from smoltrain.hf.interop import import_model

    out = import_model(a.src, a.out, tokenizer=a.tokenizer, force=a.force)
    print(f"Imported {a.src} -> {out}")
    return 0


def _cmd_export(a: argparse.Namespace) -> int:
    if a.space is not None:
        return _export_space(a)
    if a.format == "gguf":
        return _export_gguf(a)
    if a.dtype is not None:
        raise UserError("--dtype chooses the weights' type of a GGUF export; add --format gguf (an HF export "
                        "is fp32 safetensors).")
    if a.push_to_hub:
        from smoltrain.hf.hub import check_token, push_folder

        check_token(a.push_to_hub)  # before any work
    elif a.out is None:
        raise UserError("export needs --out DIR, --space DIR or --push-to-hub REPO_ID.")
    check_model_path(a.ckpt)
    from smoltrain.hf.interop import export_hf  # torch: after the checks above, so they answer at once

    if a.out is None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="smoltrain-export-") as tmp:
            out = export_hf(a.ckpt, f"{tmp}/export")
            url = push_folder(out, a.push_to_hub, a.revision, a.private, f"smoltrain export of {a.ckpt}")
    else:
        out = export_hf(a.ckpt, a.out, force=a.force)
        print(f"Exported {a.ckpt} -> {out} (loads with transformers AutoModelForCausalLM / AutoTokenizer)")
        if a.push_to_hub:
            url = push_folder(out, a.push_to_hub, a.revision, a.private, f"smoltrain export of {a.ckpt}")
    if a.push_to_hub:
        print(f"Pushed {a.ckpt} to {a.push_to_hub} (revision {a.revision or 'main'}): {url}")
    return 0


def _export_space(a: argparse.Namespace) -> int:
    """`export CKPT --space DIR [--push-to-hub USER/NAME]`: the Space folder, then (optionally) a Space repo."""
    if a.out is not None:
        raise UserError("--space DIR writes a Space folder (the HF model inside it, in DIR/model); drop --out.")
    if a.push_to_hub:
        from smoltrain.hf.hub import check_token

        check_token(a.push_to_hub)  # before any work
    check_model_path(a.ckpt)
    from smoltrain.hf.space import export_space  # torch: after the checks above

    out = export_space(a.ckpt, a.space, force=a.force)
    print(f"Wrote the Space folder {out}: run it with `pip install -r requirements.txt && python app.py` there")
    if a.push_to_hub:
        from smoltrain.hf.hub import push_folder

        url = push_folder(out, a.push_to_hub, a.revision, a.private, f"smoltrain Space of {a.ckpt}", "space")
        print(f"Pushed the Space to {a.push_to_hub} (revision {a.revision or 'main'}): {url}")
    return 0


def _export_gguf(a: argparse.Namespace) -> int:
    """`export CKPT --format gguf --out FILE.gguf [--dtype f32|f16|bf16|q8_0]`: one file for llama.cpp/Ollama."""
    if a.push_to_hub:
        raise UserError("--push-to-hub uploads HF directories; upload a .gguf with `hf upload REPO FILE.gguf`.")
    if a.out is None:
        raise UserError("export --format gguf needs --out FILE.gguf.")
    check_model_path(a.ckpt)
    from smoltrain.hf.interop import export_gguf  # torch: after the checks above

    out = export_gguf(a.ckpt, a.out, dtype=a.dtype or "f32", force=a.force)
    print(f"Exported {a.ckpt} -> {out} (GGUF, {a.dtype or 'f32'}: runs in llama.cpp, Ollama, LM Studio)")
    return 0


def add_model_commands(sub) -> None:
    p = sub.add_parser("assets", help="fetch the offline reference assets (SmolLM2-135M-Instruct GGUF, Shakespeare)")
    p.add_argument("--dir", default=None, help="cache directory (default ~/.cache/smoltrain/assets)")
    p.set_defaults(func=_cmd_assets)

    p = sub.add_parser("import", help="import an HF model directory or a .gguf file as a smoltrain checkpoint")
    p.add_argument("src", help="HF model directory (safetensors or .bin) or a .gguf file")
    p.add_argument("--out", required=True, type=out_dir, help="checkpoint directory to write")
    p.add_argument("--tokenizer", default=None, help="tokenizer to keep with it (default: the source's own)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser("export", help="export a checkpoint (or a run's newest) as an HF directory or a GGUF file")
    p.add_argument("ckpt", help="checkpoint directory or run directory")
    p.add_argument("--space", default=None, type=out_dir, metavar="DIR",
                   help="write a Hugging Face Space folder instead (app.py, requirements.txt, README, the model): "
                        "`pip install -r requirements.txt && python app.py` runs it without smoltrain")
    p.add_argument("--out", default=None, type=out_path,
                   help="HF directory to write (optional with --push-to-hub), or with --format gguf the .gguf file")
    p.add_argument("--format", choices=("hf", "gguf"), default="hf",
                   help="hf: a transformers directory (default); gguf: one file for llama.cpp, Ollama, LM Studio")
    p.add_argument("--dtype", choices=("f32", "f16", "bf16", "q8_0"), default=None,
                   help="with --format gguf: the weights' type (default f32; norms stay f32)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out or --space (only an earlier export of the same kind)")
    p.add_argument("--push-to-hub", default=None, metavar="REPO_ID",
                   help="upload the export to this Hub model repo, or with --space to this Space repo "
                        "(HF_TOKEN, HF_ENDPOINT honoured)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo as private")
    p.add_argument("--revision", default=None, metavar="BRANCH", help="with --push-to-hub: branch (default main)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("generate", help="generate text from a checkpoint")
    p.add_argument("ckpt", help="checkpoint directory, run directory or HF directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt-file", help="a file with one prompt per line (generated as a batch)")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=100, help="tokens to generate after the prompt")
    p.add_argument("--temperature", type=ranged(domain.temperature, float), default=SAMPLING.temperature,
                   help="0 means greedy")
    p.add_argument("--top-k", type=ranged(domain.nonneg("off")), default=SAMPLING.top_k, help="0 disables")
    p.add_argument("--top-p", type=ranged(domain.top_p, float), default=SAMPLING.top_p, help="1.0 disables")
    p.add_argument("--repetition-penalty", type=ranged(domain.positive, float), default=SAMPLING.repetition_penalty,
                   help="1.0 disables (HF semantics)")
    p.add_argument("--seed", type=ranged(domain.seed), default=None, help="sampling seed (default: a random one)")
    p.add_argument("--device", default="auto", type=DEVICE, help="auto (cuda > mps > cpu), cpu, cuda, mps")
    p.add_argument("--no-stream", action="store_true", help="print when done instead of token by token")
    p.add_argument("--weights", choices=["fp32", "int8"], default="fp32",
                   help="int8: weight-only 8-bit decoding on the CPU (a scale and minimum per 32 weights; 1.25 "
                        "bytes per weight instead of 4, faster; its quality and speed: BENCHMARKS.md); default fp32")
    p.set_defaults(func=generate_cli)


def _read_prompts(a: argparse.Namespace) -> list[str]:
    """--prompt, or the non-blank lines of --prompt-file (a literal \\n in a line is a newline)."""
    if a.prompt is not None:
        return [a.prompt]
    try:
        lines = open(a.prompt_file, encoding="utf-8").read().splitlines()
    except OSError as e:
        raise UserError(f"Cannot read --prompt-file: {e}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"--prompt-file {a.prompt_file} is not UTF-8 text ({e.reason} at byte {e.start}); is it "
                        "the right file?") from None
    prompts = [line.replace("\\n", "\n") for line in lines if line.strip()]
    if not prompts:
        raise UserError(f"--prompt-file {a.prompt_file} holds no prompts.")
    return prompts


def generate_cli(a: argparse.Namespace) -> int:
    """`smoltrain generate CKPT --prompt TEXT` streams one continuation; `--prompt-file FILE` decodes
    its prompts in batches of PROMPT_BATCH, each checked before any work."""
    cfg = SamplingConfig(a.temperature, a.top_k, a.top_p, a.repetition_penalty)
    cfg.validate()
    prompts = _read_prompts(a)
    check_model_path(a.ckpt)  # these checks before torch's import (seconds)
    from smoltrain.device import amp_dtype, pick_device
    from smoltrain.hf.interop import load_model
    from smoltrain.model.generate import decode_weights, prepare_for_decode

    device = pick_device(a.device)
    weights = decode_weights(a.weights, device)
    model, tok, _ = load_model(a.ckpt, device=device, dtype=amp_dtype(device))
    prepare_for_decode(model, weights)
    if len(prompts) == 1:
        _generate_one(model, tok, prompts[0], cfg, a)
    else:
        _generate_batches(model, tok, prompts, cfg, a)
    return 0


def _generate_one(model, tok, prompt: str, cfg, a: argparse.Namespace) -> None:
    from smoltrain.model.generate import generate, stream_text

    tokens = generate(model, tok.encode(prompt), a.max_new_tokens, cfg, a.seed)
    sys.stdout.write(prompt)
    if a.no_stream:
        sys.stdout.write(tok.decode(list(tokens)))
    else:
        for piece in stream_text(tokens, tok.decode):
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write("\n")


def _generate_batches(model, tok, prompts: list[str], cfg, a: argparse.Namespace) -> None:
    from smoltrain.model.generate import PROMPT_BATCH, generate_batch, token_budget

    encoded = [tok.encode(p) for p in prompts]
    for prompt, ids in zip(prompts, encoded):  # every prompt checked before any work
        if not ids:
            raise UserError(f"The prompt {prompt!r} encodes to no tokens.")
        token_budget(model, ids, a.max_new_tokens)
    for lo in range(0, len(prompts), PROMPT_BATCH):
        hi = min(lo + PROMPT_BATCH, len(prompts))
        seeds = [None if a.seed is None else a.seed + n for n in range(lo, hi)]
        outs = generate_batch(model, encoded[lo:hi], a.max_new_tokens, cfg, seeds)
        for n, new_ids in zip(range(lo, hi), outs):
            print(f"=== prompt {n + 1}/{len(prompts)} ===")
            print(prompts[n] + tok.decode(new_ids), flush=True)
