"""Multiple-choice task scoring: lm-eval's encoding and metrics, the JSONL format, suites by name, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from .conftest import assert_user_error, run_cli

ITEMS = [
    {"context": "To be, or not to be, that is the ", "choices": ["question", "banana", "sword of the king"], "label": 0},
    {"context": "The quick brown fox", "choices": [" jumps over the lazy dog.", " sat.", " 東京"], "label": 1},
    {"context": "", "choices": ["def add(a, b):", "zzz qqq"], "label": 0},
    {"context": "Numbers 0123456789 and", "choices": [" café", " naïve, 東京.", " the"], "label": 2},
]


def write_jsonl(path, items) -> str:
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    return str(path)


class PlainLM:
    """lm-eval's own request handling (TemplateLM.loglikelihood -> _encode_pair) over a full forward per
    request: the reference our prefix-cached scorer must agree with."""

    def __init__(self, model, tok):
        from lm_eval.api.model import TemplateLM

        class _LM(TemplateLM):
            eot_token_id = tok.eot_id  # lm-eval's default prefix token

            def tok_encode(self, string, **kw):
                return tok.encode(string)

            def _loglikelihood_tokens(self, requests, **kw):
                out = []
                for _, ctx, cont in requests:
                    x = torch.tensor([(ctx + cont)[:-1]])
                    with torch.no_grad():
                        logp = F.log_softmax(model(x)[0, -len(cont):].float(), -1)
                    ll = float(logp.gather(-1, torch.tensor(cont)[:, None]).sum())
                    out.append((ll, bool((logp.argmax(-1) == torch.tensor(cont)).all())))
                return out

            def loglikelihood_rolling(self, requests, **kw):
                raise NotImplementedError

            def generate_until(self, requests, **kw):
                raise NotImplementedError

        self.lm = _LM()

    def loglikelihood(self, pairs):
        from lm_eval.api.instance import Instance

        reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
        return [ll for ll, _ in self.lm.loglikelihood(reqs, disable_tqdm=True)]


@pytest.fixture(scope="module")
def tiny(tiny_ckpt):
    from smoltrain.hf.interop import load_model

    model, tok, _ = load_model(tiny_ckpt)
    return model.eval(), tok


def test_encode_pair_is_lm_evals(tiny):
    from smoltrain.eval.tasks import encode_pair

    _, tok = tiny
    ctx, cont = encode_pair(tok, "To be, or not to be, that is the ", "question")
    assert ctx == tok.encode("To be, or not to be, that is the")  # the trailing space moved ...
    assert cont == tok.encode("To be, or not to be, that is the question")[len(ctx):]  # ... to the continuation
    assert encode_pair(tok, "", "zzz") == ([tok.eot_id], tok.encode("zzz"))  # its BOS is <|endoftext|>


def test_scores_equal_lm_eval_requests_on_full_forwards(tiny):
    """Prefix-cached, batched log-likelihoods = lm-eval's requests scored one full forward at a time."""
    from smoltrain.eval.tasks import Scorer, _item_from_line, item_loglikelihoods

    model, tok = tiny
    scorer = Scorer(model, torch.device("cpu"), model.config.max_position_embeddings)
    ref = PlainLM(model, tok)
    for n, obj in enumerate(ITEMS):
        item = _item_from_line(obj, f"line {n}")
        ours = item_loglikelihoods(scorer, tok, item)
        theirs = ref.loglikelihood(item.requests)
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


def test_batched_scores_equal_each_request_alone(tiny):
    """Contexts prefilled together (left-padded), choices of different lengths batched after them, across
    several batches (a small token budget): the same log-likelihoods and greedy flags as each request scored
    alone and as one full forward per request, on weights large enough that every token depends on its
    context (at std 0.02 a wrong mask or position would hardly show)."""
    from smoltrain.eval.tasks import Scorer, encode_pair
    from smoltrain.model.llama import build_model
    from smoltrain.presets import get_preset

    _, tok = tiny
    torch.manual_seed(1)
    model = build_model(get_preset("tiny").replace(initializer_range=0.2)).eval()
    items = ITEMS + [{"context": "a", "choices": ["b", " longer choice of many tokens here", "c d"], "label": 0},
                     {"context": "A much longer context, " * 6, "choices": ["x", " y z"], "label": 0},
                     {"context": "", "choices": ["q", "a rather longer empty-context choice"], "label": 0}]
    requests = [encode_pair(tok, it["context"], c) for it in items for c in it["choices"]]
    assert len({len(c) for c, _ in requests}) >= 4 and len({len(x) for _, x in requests}) >= 5
    cpu = torch.device("cpu")
    max_length = model.config.max_position_embeddings
    batched = Scorer(model, cpu, max_length, token_budget=200).score(requests)
    alone = [Scorer(model, cpu, max_length).score([r])[0] for r in requests]
    with torch.no_grad():
        full = [Scorer(model, cpu, max_length)._score_full(c, x) for c, x in requests]
    for got in (batched, alone):
        np.testing.assert_allclose([s[0] for s in got], [s[0] for s in full], rtol=0, atol=1e-4)
        assert [s[1] for s in got] == [s[1] for s in full]
    assert len({round(s[0], 3) for s in full}) == len(full)  # lively: no two requests score alike
    one_batch = Scorer(model, cpu, max_length, token_budget=10**6).score(requests)
    np.testing.assert_allclose([s[0] for s in one_batch], [s[0] for s in full], rtol=0, atol=1e-4)


def test_eval_tasks_json_matches_lm_eval_metrics(tiny, tiny_ckpt, tmp_path):
    """acc = argmax of summed log-probs, acc_norm = argmax of log-prob / characters of the choice."""
    model, tok = tiny
    ref = PlainLM(model, tok)
    acc = acc_norm = 0
    for obj in ITEMS:
        lls = np.array(ref.loglikelihood([(obj["context"], c) for c in obj["choices"]]))
        acc += int(np.argmax(lls) == obj["label"])
        acc_norm += int(np.argmax(lls / np.array([len(c) for c in obj["choices"]])) == obj["label"])
    task = write_jsonl(tmp_path / "mini.jsonl", ITEMS)
    proc = run_cli("eval", tiny_ckpt, "--tasks", task, "--json", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["model"] == str(tiny_ckpt)
    assert out["tasks"] == {"mini": {"acc": acc / len(ITEMS), "acc_norm": acc_norm / len(ITEMS), "n": len(ITEMS)}}
    other = write_jsonl(tmp_path / "other.jsonl", ITEMS[::-1])
    proc = run_cli("eval", tiny_ckpt, "--tasks", f"{task},{other}", "--tasks", task, "--limit", "2", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()[1:]]
    assert [(r[1], r[-1]) for r in rows] == [("mini", "2"), ("other", "2")]  # a repeated task is scored once


@pytest.mark.parametrize("line, needle", [
    ('{"context": "a", "choices": ["b", "c"]}', "line 2 lacks label"),
    ('{"context": "a", "choices": ["b", "c"], "label": 2}', "line 2: label must be an integer index"),
    ('{"context": "a", "choices": [], "label": 0}', "line 2: choices must be a list"),
    ('{"context": "a", "choices": ["b", ""], "label": 0}', "line 2: choices must be a list"),
    ('not json', "line 2 is not valid JSON"),
])
def test_bad_task_file_is_exit_2_naming_the_line(tiny_ckpt, tmp_path, line, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ITEMS[0]) + "\n" + line + "\n")
    assert_user_error(run_cli("eval", tiny_ckpt, "--tasks", path, "--device", "cpu"), needle, str(path))


def test_eval_needs_data_or_tasks(tiny_ckpt, tmp_path):
    assert_user_error(run_cli("eval", tiny_ckpt), "exactly one of --data")
    assert_user_error(run_cli("eval", tiny_ckpt, "--tasks", "nonsense_task"), "unknown task", "arc_easy")
    assert_user_error(run_cli("eval", tiny_ckpt, "--tasks", tmp_path / "missing.jsonl"), "does not exist")


ARC_ROWS = [
    {"id": "q1", "question": "Which is a mammal?", "choices": {"text": ["shark", "whale", "trout"],
                                                              "label": ["A", "B", "C"]}, "answerKey": "B"},
    {"id": "q2", "question": "Water boils at", "choices": {"text": ["100 C", "10 C"], "label": ["1", "2"]},
     "answerKey": "1"},
]


@pytest.mark.slow  # lm-eval indexes its ~10k task files first (about 10 s of CPU)
def test_suite_by_name_takes_lm_evals_prompts(monkeypatch):
    """arc_easy through lm-eval's own task definition, its dataset loader given a local stand-in."""
    import datasets

    from smoltrain.eval import tasks as tasks

    calls = []

    def fake_load_dataset(path=None, name=None, **kw):
        calls.append((path, name))
        return datasets.DatasetDict({split: datasets.Dataset.from_list(ARC_ROWS)
                                     for split in ("train", "validation", "test")})

    monkeypatch.setattr(tasks, "hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task = tasks.load_task("arc_easy", limit=None)
    assert calls == [("allenai/ai2_arc", "ARC-Easy")]
    assert task.name == "arc_easy" and len(task.items) == 2
    first = task.items[0]
    assert first.requests == [("Question: Which is a mammal?\nAnswer:", f" {c}") for c in ("shark", "whale", "trout")]
    assert first.norm_lengths == [5, 5, 5] and first.label == 1
    assert task.items[1].label == 0


@pytest.mark.slow
def test_unreachable_hub_is_exit_2_and_leaves_nothing_offline(monkeypatch, tmp_path):
    """The offline switch lasts for the load only: afterwards the environment and both libraries' flags
    are as they were, so a later push_to_hub in the same process still goes online."""
    import os

    import datasets.config
    import huggingface_hub.constants

    from smoltrain.errors import UserError
    from smoltrain.eval import tasks as tasks

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    flags = ((huggingface_hub.constants, "HF_HUB_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE"),
             (datasets.config, "HF_DATASETS_OFFLINE"))
    for mod, attr in flags:
        monkeypatch.setattr(mod, attr, False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    monkeypatch.setattr(tasks, "hub_reachable", lambda: False)
    seen = []
    real = datasets.load_dataset

    def spy(*a, **kw):  # the load itself runs offline
        seen.append([getattr(mod, attr) for mod, attr in flags])
        return real(*a, **kw)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    with pytest.raises(UserError, match="hub is not reachable.*--tasks FILE.jsonl"):
        tasks.load_task("arc_easy")
    assert seen and all(all(s) for s in seen)
    assert [getattr(mod, attr) for mod, attr in flags] == [False, False, False]
    assert not [k for k in os.environ if "OFFLINE" in k]  # (lm-eval itself sets HF_XET_HIGH_PERFORMANCE)


# --- the next-line task and in-loop evaluation ---------------------------------------------------
@pytest.fixture(scope="module")
def verse_corpus(tmp_path_factory) -> Path:
    """12 'plays' of short lines; every line ends with its play's tag (p3), so its origin can be checked."""
    from .conftest import make_corpus_text

    d = tmp_path_factory.mktemp("verse")
    for i, doc in enumerate(make_corpus_text(12, seed=5, words_per_doc=(400, 600))):
        words = doc.split()
        lines = [" ".join(words[j:j + 6]) + f" p{i}" for j in range(0, len(words), 6)]
        (d / f"play{i:02d}.txt").write_text(f"PLAY {i}\n\n" + "\n".join(lines) + "\n")
    return d


def verse_sets(tok_dir, corpus, run_dir) -> list[str]:
    return [f"data.tokenizer={tok_dir}", "data.train_tokenizer_vocab_size=0", "data.max_documents=null",
            f"data.datasets=[{{name: verse, sources: ['{corpus}']}}]", "data.val_fraction=0.25", "data.num_proc=1",
            f"run.dir={run_dir}", f"run.data_dir={run_dir}/data"]


def test_next_line_task_from_held_out_documents(tiny_tokenizer_dir, verse_corpus, tmp_path):
    from smoltrain.data.prepare import prepare
    from smoltrain.eval.nextline import held_out_documents

    data = tmp_path / "data"
    prepare([str(verse_corpus)], tiny_tokenizer_dir, data, val_fraction=0.25, num_proc=1, progress=False,
            verbose=False)
    docs = held_out_documents(data)
    tags = {d.splitlines()[2].split()[-1] for d in docs}
    assert len(docs) == 3 and len(tags) == 3  # the three held-out plays, decoded back to their exact text
    assert all(d == (verse_corpus / f"play{t[1:].zfill(2)}.txt").read_text() for d, t in
               zip(docs, [d.splitlines()[2].split()[-1] for d in docs]))
    out = tmp_path / "nl.jsonl"
    proc = run_cli("tasks", "next-line", "--data", data, "--out", out, "--items", "40")
    assert proc.returncode == 0, proc.stderr
    assert_user_error(run_cli("tasks", "next-line", "--data", data, "--out", out), "exists", "--force")
    first = out.read_bytes()
    assert run_cli("tasks", "next-line", "--data", data, "--out", out, "--items", "40", "--force").returncode == 0
    assert out.read_bytes() == first  # deterministic by seed
    items = [json.loads(line) for line in first.decode().splitlines()]
    assert len(items) == 40
    for it in items:
        answer = it["choices"][it["label"]]
        doc = next(d for d in docs if answer in d)
        tag = answer.split()[-1]
        assert tag in tags and it["context"].endswith("\n") and (it["context"] + answer + "\n") in doc
        assert len(set(it["choices"])) == 4 and all(c.split()[-1] == tag for c in it["choices"])  # same play
    assert len({it["label"] for it in items}) == 4


def plain_scores(ckpt: Path, items: list[dict]) -> dict:
    """An oracle beside the batched Scorer: each (context, choice) in its own forward, log-probs summed;
    acc_norm divides by the choice's length in characters (lm-eval's)."""
    from smoltrain.eval.tasks import encode_pair
    from smoltrain.hf.interop import load_model

    model, tok, _ = load_model(str(ckpt), device=torch.device("cpu"))
    acc = acc_norm = 0
    for it in items:
        lls = []
        for choice in it["choices"]:
            ctx, cont = encode_pair(tok, it["context"], choice)
            with torch.no_grad():
                out = model(torch.tensor([ctx + cont[:-1]]))
            logp = F.log_softmax(getattr(out, "logits", out)[0, -len(cont):].float(), dim=-1)
            lls.append(float(logp.gather(-1, torch.tensor(cont)[:, None]).sum()))
        acc += int(np.argmax(lls) == it["label"])
        acc_norm += int(np.argmax(np.array(lls) / [len(c) for c in it["choices"]]) == it["label"])
    return {"acc": acc / len(items), "acc_norm": acc_norm / len(items)}


def test_training_logs_task_accuracy(tiny_tokenizer_dir, verse_corpus, tmp_path):
    """eval.tasks runs at every evaluation: metrics.jsonl gets task/<name>/acc and acc_norm, equal to
    `smoltrain eval --tasks` on the checkpoint of the same step."""
    from smoltrain.config import load_config
    from smoltrain.train.trainer import Trainer

    from .conftest import DEBUG_TINY

    run = tmp_path / "run"
    mc = write_jsonl(tmp_path / "mc.jsonl", ITEMS)
    sets = verse_sets(tiny_tokenizer_dir, verse_corpus, run) + [
        f"eval.tasks=[next-line:verse, '{mc}']", "eval.tasks_limit=5", "train.max_steps=4", "eval.every=2",
        "checkpoint.every=2", "checkpoint.keep_last=0"]
    Trainer(load_config(DEBUG_TINY, sets)).train()
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    task_recs = [r for r in recs if "task/verse-next-line/acc" in r]
    assert [r["step"] for r in task_recs] == [2, 4]
    built = run / "data" / "tasks" / "verse-next-line.jsonl"
    verse = [json.loads(line) for line in built.read_text().splitlines()][:5]
    for r in task_recs:  # what each evaluation logged is what a plain scorer finds on that step's weights
        ckpt = run / "checkpoints" / f"step_{r['step']:08d}"
        for name, items in (("mc", ITEMS), ("verse-next-line", verse)):
            oracle = plain_scores(ckpt, items)
            assert {m: r[f"task/{name}/{m}"] for m in oracle} == oracle, (r, name)
    shutil.rmtree(run / "checkpoints" / "step_00000002")  # the report below reads the final checkpoint only
    proc = run_cli("eval", run, "--tasks", f"{built},{mc}", "--limit", "5", "--json", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    final = json.loads(proc.stdout)["tasks"]
    assert final["verse-next-line"]["n"] == 5
    for name in ("verse-next-line", "mc"):
        for metric in ("acc", "acc_norm"):
            assert task_recs[-1][f"task/{name}/{metric}"] == final[name][metric]
    # the report's task table (this run's checkpoint beside a reference) and the export's model card
    extra = write_jsonl(tmp_path / "extra.jsonl", ITEMS[:2])
    proc = run_cli("report", run, "--out", tmp_path / "report", "--tasks", extra, "--reference", run, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    page = (tmp_path / "report" / "index.html").read_text()
    assert "Downstream tasks per checkpoint" in page and 'alt="downstream tasks"' in page
    for name in ("verse-next-line", "mc", "extra"):
        assert f"<th>{name} acc</th><th>{name} acc_norm</th>" in page
    row = f"<td>step 4</td><td class='num nowrap'>{final['verse-next-line']['acc']:.4f}</td>"
    section = page[page.index("Downstream tasks per checkpoint"):][:3000]
    assert row in section and section.count("<td>step 4</td>") == 1 and "5/4/2" in section, section
    assert run_cli("export", run, "--out", tmp_path / "hf").returncode == 0
    card = (tmp_path / "hf" / "README.md").read_text()
    scores = final["verse-next-line"]
    assert (f"downstream task `verse-next-line` (zero-shot multiple choice, lm-eval's scoring): acc "
            f"{scores['acc']:.4f}, acc_norm {scores['acc_norm']:.4f} (step 4)") in card


# --- parity with lm-evaluation-harness on the real SmolLM2-135M-Instruct --------------------------
PARITY_ITEMS = ITEMS + [
    {"context": "Question: What is the capital of France?\nAnswer:", "choices": [" Paris", " London", " Rome"], "label": 0},
    {"context": "ROMEO:\nBut, soft! what light through yonder window breaks?\n",
     "choices": ["It is the east, and Juliet is the sun.", "The quick brown fox jumps over the lazy dog.",
                 "Sell the shares before the market closes."], "label": 0},
    {"context": "2 + 2 =", "choices": [" 4", " 5", " 22", " four"], "label": 0},
    {"context": "The opposite of hot is  ", "choices": ["cold", "warm", "spicy"], "label": 0},
]


def lm_eval_reference(hf_dir, task_file) -> tuple[dict, list[list[float]]]:
    """lm-eval's own pipeline: its `hf` model on our export, the JSONL file as a custom local task."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    task = {"task": "smoltrain_mc", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": task_file}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "context",
            "doc_to_choice": "choices", "doc_to_target": "label", "target_delimiter": "",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}
    lm = HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=8)
    res = simple_evaluate(model=lm, tasks=[task], num_fewshot=0, log_samples=True)
    samples = sorted(res["samples"]["smoltrain_mc"], key=lambda s: s["doc_id"])
    lls = [[r[0][0] for r in s["resps"]] for s in samples]
    r = res["results"]["smoltrain_mc"]
    return {"acc": r["acc,none"], "acc_norm": r["acc_norm,none"], "n": len(samples)}, lls


@pytest.mark.slow
def test_real_smollm2_scores_equal_lm_evals(real_ckpt, real_hf, tmp_path):
    from smoltrain.eval.tasks import item_loglikelihoods, load_jsonl_task, load_scorer

    ckpt, hf_dir = real_ckpt, real_hf
    task = write_jsonl(tmp_path / "parity.jsonl", PARITY_ITEMS)
    proc = run_cli("eval", ckpt, "--tasks", task, "--json", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    ours = json.loads(proc.stdout)["tasks"]["parity"]
    theirs, their_lls = lm_eval_reference(hf_dir, task)
    assert ours == theirs
    assert 0 < ours["acc"] < 1 or 0 < ours["acc_norm"] < 1 or ours["acc"] != ours["acc_norm"]  # not degenerate
    scorer, tok, _ = load_scorer(str(ckpt), torch.device("cpu"))
    our_lls = [item_loglikelihoods(scorer, tok, item) for item in load_jsonl_task(task).items]
    for a, b in zip(our_lls, their_lls, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
