"""The `smoltrain` command: the only layer that parses arguments; the work lives in the modules.

Each submodule adds its commands' parsers and holds their `*_cli` functions (argparse.Namespace in,
exit code out). Nothing in the package imports this layer; errors become exit codes here: a
UserError is exit 2 with one paragraph, a TrainingError exit 1, anything else a reported bug.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from smoltrain.cli.args import Parser
from smoltrain.cli.data import add_data_commands, add_tasks_command
from smoltrain.cli.models import add_model_commands
from smoltrain.cli.runs import add_show_commands, add_train_commands
from smoltrain.errors import TrainingError, UserError

DESCRIPTION = "Pretrain SmolLM2-family models: prepare data, train, evaluate, generate, export, report, demo."


def build_parser() -> argparse.ArgumentParser:
    import platform

    from smoltrain import __version__

    parser = Parser(prog="smoltrain", description=DESCRIPTION)
    parser.add_argument("--version", action="version",
                        version=f"smoltrain {__version__} (Python {platform.python_version()})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_model_commands(sub)
    add_data_commands(sub)
    add_tasks_command(sub)
    add_train_commands(sub)
    add_show_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"smoltrain {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"smoltrain {args.command}: stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    except Exception as e:
        from smoltrain.storage import is_no_space

        if is_no_space(e):  # a full disk is not a bug: one message; the partial output was already removed
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            print(f"smoltrain {args.command}: stopped: no space left on device{where}. What was being written was "
                  "removed and earlier outputs (checkpoints included) are intact; free some space and run the "
                  "same command again.", file=sys.stderr)
            return 1
        traceback.print_exc()
        print(f"smoltrain {args.command}: internal error (a bug: please report it with the traceback above)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
