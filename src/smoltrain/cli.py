"""The `smoltrain` command: argument parsing and dispatch only; the work lives in the modules."""

from __future__ import annotations

import argparse
import sys
import traceback

from smoltrain.errors import UserError


def _cmd_assets(a: argparse.Namespace) -> int:
    from smoltrain.assets import fetch_assets

    paths = fetch_assets(a.dir)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _cmd_import(a: argparse.Namespace) -> int:
    from smoltrain.interop import import_model

    out = import_model(a.src, a.out, tokenizer=a.tokenizer, force=a.force)
    print(f"Imported {a.src} -> {out}")
    return 0


def _cmd_export(a: argparse.Namespace) -> int:
    from smoltrain.interop import export_hf

    out = export_hf(a.ckpt, a.out, force=a.force)
    print(f"Exported {a.ckpt} -> {out} (loads with transformers AutoModelForCausalLM / AutoTokenizer)")
    return 0


def _cmd_generate(a: argparse.Namespace) -> int:
    from smoltrain.generate import generate_cli

    return generate_cli(a)


def _add_model_commands(sub) -> None:
    p = sub.add_parser("assets", help="fetch the offline reference assets (SmolLM2-135M-Instruct GGUF, Shakespeare)")
    p.add_argument("--dir", default=None, help="cache directory (default ~/.cache/smoltrain/assets)")
    p.set_defaults(func=_cmd_assets)

    p = sub.add_parser("import", help="import an HF model directory or a .gguf file as a smoltrain checkpoint")
    p.add_argument("src", help="HF model directory (safetensors or .bin) or a .gguf file")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--tokenizer", default=None, help="tokenizer to keep with it (default: the source's own)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser("export", help="export a checkpoint (or a run's newest) as an HF directory")
    p.add_argument("ckpt", help="checkpoint directory or run directory")
    p.add_argument("--out", required=True, help="HF directory to write")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("generate", help="generate text from a checkpoint")
    p.add_argument("ckpt", help="checkpoint directory, run directory or HF directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt-file", help="a file with one prompt per line (generated as a batch)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 disables")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 disables")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1.0 disables (HF semantics)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    p.add_argument("--no-stream", action="store_true", help="print when done instead of token by token")
    p.set_defaults(func=_cmd_generate)


# --- data commands (prepare, tokenizer) ---
def _add_data_commands(sub) -> None:
    pass
# --- end data commands ---


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smoltrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_model_commands(sub)
    _add_data_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"smoltrain {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print(f"smoltrain {args.command}: internal error (a bug: please report it with the traceback above)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
