"""Model cards tell the truth: base or instruction-tuned from the source's own metadata."""

from __future__ import annotations

import json

from smoltrain.hf.interop import hf_origin
from smoltrain.hf.modelcard import intended_use, model_kind


def test_model_kind_from_names_and_chat_template():
    assert model_kind(["SmolLM2-135M-Instruct"], has_chat_template=False) == "instruct"
    assert model_kind(["SmolLM2-135M"], has_chat_template=True) == "instruct"
    assert model_kind(["SmolLM2-135M", None], has_chat_template=False) == "base"


def test_hf_origin_reads_the_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_name_or_path": "HuggingFaceTB/SmolLM2-360M"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 8192}))
    assert hf_origin(tmp_path) == {"source": str(tmp_path), "name": "HuggingFaceTB/SmolLM2-360M", "kind": "base"}


def test_intended_use_per_kind():
    instruct = intended_use(False, {"source": "x.gguf", "kind": "instruct"})
    assert "instruction-tuned" in instruct and "does not follow instructions" not in instruct
    base = intended_use(False, {"source": "d", "kind": "base"})
    assert "A base language model imported from `d`" in base and "losses above" not in base
    trained = intended_use(True)
    assert "described above" in trained and "losses above" in trained


def test_card_markdown_is_not_html_escaped(tmp_path):
    """A Markdown card says `&` and `<`, not `&amp;`: the card's templates are not autoescaped."""
    from smoltrain.hf.modelcard import model_card
    from smoltrain.presets import get_preset

    (tmp_path / "origin.json").write_text(json.dumps({"source": "hf/A&B <x>", "name": "A&B <Base>", "kind": "base"}))
    card = model_card(get_preset("tiny"), tmp_path)
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert card.splitlines()[5] == "# A&B <Base>"
    assert "A base language model imported from `hf/A&B <x>`: it continues text." in card
    assert "&amp;" not in card and "&lt;" not in card
    assert "| context | " in card and "## Training" not in card and card.endswith("decisions about people.\n")


def test_the_card_names_the_optimizer_that_ran():
    """The shipped quickstart trains with Muon + AdamW: its card says so, with both groups' settings;
    an AdamW run's line is AdamW's."""
    from pathlib import Path

    from smoltrain.config import load_config
    from smoltrain.hf.modelcard import optimizer_line

    configs = Path(__file__).parent.parent / "configs"
    muon = load_config(configs / "quickstart.yaml").optim
    line = optimizer_line(load_config(configs / "quickstart.yaml").to_dict()["optim"])
    assert line.startswith("Muon for the decoder's hidden matrices") and " + AdamW for the embedding and norms" in line
    for setting in (f"peak lr {muon.muon_lr}", f"momentum {muon.muon_momentum}", f"peak lr {muon.lr}",
                    f"weight decay {muon.weight_decay}", f"lr adjustment {muon.muon_adjust_lr}"):
        assert setting in line, (setting, line)
    adamw = load_config(configs / "debug-tiny.yaml").to_dict()["optim"]
    assert optimizer_line(adamw) == "AdamW (betas 0.9, 0.95; eps 1e-08; weight decay 0.01)"
    assert optimizer_line({**adamw, "eight_bit": True}).startswith("AdamW8bit (bitsandbytes) (betas 0.9")
