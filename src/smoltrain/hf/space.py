"""`smoltrain export CKPT --space DIR`: a Hugging Face Space folder that runs without smoltrain.

DIR holds README.md (the Space's metadata header: sdk gradio, app_file app.py), app.py (space_app.py,
copied: torch, transformers, gradio and numba only) and int8_linear.py (its 8-bit layer, copied from
smoltrain.model), requirements.txt pinned to the versions installed here (those
the suite tests it with), space.json (title, example prompts from the run's eval.prompts, defaults) and
model/ (the HF export with its model card). A stranger runs it with `pip install -r requirements.txt &&
python app.py`; `--push-to-hub USER/NAME` uploads it as a Space repo.
"""

from __future__ import annotations

import json
import sys
from importlib import metadata
from pathlib import Path

import yaml

from smoltrain.checkpoint.discovery import resolve_checkpoint
from smoltrain.hf.interop import (
    load_resolved,
    model_state,
    save_model_files,
    write_hf_extras,
)
from smoltrain.hf.modelcard import card_title, read_origin, render
from smoltrain.model import int8_linear
from smoltrain.storage import check_target, publish

COMMAND = "export --space"  # the marker that tells an earlier Space export of ours from anything else
APP = Path(__file__).with_name("space_app.py")
INT8 = Path(int8_linear.__file__)  # app.py's 8-bit layer: the same file smoltrain decodes with
REQUIREMENTS = ("torch", "transformers", "gradio", "numba")  # what app.py imports; the rest comes with them
DEFAULT_EXAMPLES = ["Once upon a time,"]


def pinned(package: str) -> str:
    """`package==VERSION` as installed here, without a local build label (torch 2.13.0+cpu -> 2.13.0)."""
    return f"{package}=={metadata.version(package).split('+')[0]}"


def space_settings(src: Path, num_params: int) -> dict:
    """What app.py reads: the title, the run's eval.prompts as examples, the default weights and length."""
    run_eval = {}
    config = src / "config.yaml"
    if config.is_file():
        run_eval = (yaml.safe_load(config.read_text()) or {}).get("eval") or {}
    made = "imported into smoltrain" if read_origin(src) else "trained with smoltrain"
    return {"title": card_title(src), "examples": list(run_eval.get("prompts") or DEFAULT_EXAMPLES),
            "description": f"A {num_params / 1e6:.1f}M-parameter SmolLM2-architecture language model, {made}.",
            "short_description": f"A {num_params / 1e6:.0f}M-parameter SmolLM2 model, {made}"[:60],
            "max_new_tokens": int(run_eval.get("sample_tokens") or 64), "weights": "int8"}


def space_readme(settings: dict, src: Path) -> str:
    """README.md: the Space metadata header (sdk, app_file, versions) and how to run the folder anywhere."""
    versions = {p: pinned(p).split("==")[1] for p in REQUIREMENTS}
    values = {"title": settings["title"].rsplit("/", 1)[-1][:30], "heading": settings["title"],
              "description": settings["description"], "short_description": settings["short_description"],
              "gradio_version": versions["gradio"], "torch_version": versions["torch"],
              "python_version": f"{sys.version_info.major}.{sys.version_info.minor}", "src": str(src)}
    return render("space_readme.md.j2", values)


def export_space(ckpt: str | Path, out: str | Path, force: bool = False) -> Path:
    """Write the Space folder for a checkpoint (or a run's newest); refuses, before any work, a DIR that
    exists and is not an earlier Space export (and an earlier one without --force)."""
    src = resolve_checkpoint(ckpt)
    out = Path(out).expanduser()
    check_target(out, COMMAND, force, inputs=[ckpt, src], flag="--space")
    model, tok, _ = load_resolved(src)
    settings = space_settings(src, model.num_params())
    with publish(out, COMMAND, {"kind": "space", "source": str(src)}, replace=force) as d:
        (d / "model").mkdir()
        save_model_files(d / "model", model_state(model), model.config, tok)
        write_hf_extras(d / "model", model.config, src)
        (d / "app.py").write_text(APP.read_text(encoding="utf-8"), encoding="utf-8")
        (d / INT8.name).write_text(INT8.read_text(encoding="utf-8"), encoding="utf-8")
        (d / "requirements.txt").write_text("".join(pinned(p) + "\n" for p in REQUIREMENTS))
        (d / "space.json").write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (d / "README.md").write_text(space_readme(settings, src), encoding="utf-8")
    return out
