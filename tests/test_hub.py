"""Push to the Hugging Face Hub without a network: huggingface_hub's own HfApi runs unchanged, with its HTTP
transport replaced (huggingface_hub.set_client_factory -> an httpx MockTransport) by a fake Hub that records
every request and answers like the Hub's API. HF_ENDPOINT is simulated by patching the endpoint constant
HfApi reads (the variable itself is read once, when huggingface_hub is imported)."""

from __future__ import annotations

import base64
import json
import re

import pytest

from smoltrain.cli import main

from .conftest import DEBUG_TINY

ENDPOINT = "http://hub.test"


ROUTE = re.compile(r"/api/(?:models|spaces)/([^/]+/[^/]+)/(refs|branch|preupload|commit)(?:/(.+))?")


class FakeHub:
    """Answers create_repo, validate-yaml, list_repo_refs, create_branch, delete_branch, preupload (every file
    'regular': inline in the commit) and commit, keeping each repo's branches (name -> head commit) as the
    Hub would: tests assert the state left on the fake Hub, not only the calls made."""

    def __init__(self):
        self.requests: list[tuple[str, str, dict]] = []
        self.commits: list[dict] = []
        self.repos: dict[str, dict[str, str]] = {}
        self.delete_status = 200  # set to 500 for a Hub that fails every delete_branch

    def add_branches(self, repo: str, *names: str) -> None:
        """A repo made before the run, with branches of the user's own."""
        heads = self.repos.setdefault(repo, {"main": "0" * 40})
        heads.update(dict.fromkeys(names, heads["main"]))

    def branches(self, repo: str) -> set[str]:
        return set(self.repos[repo])

    def __call__(self, request):
        import httpx2

        path, body = request.url.path, request.content
        self.requests.append((request.method, path, dict(request.headers)))
        if path == "/api/repos/create":
            req = json.loads(body)
            self.repos.setdefault(f"{req['organization']}/{req['name']}", {"main": "0" * 40})
            return httpx2.Response(200, json={"url": f"{ENDPOINT}/{req['organization']}/{req['name']}"})
        if path == "/api/validate-yaml":  # the model card's metadata block
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        route = ROUTE.fullmatch(path)
        if route is None or route.group(1) not in self.repos:
            return httpx2.Response(404, json={"error": f"fake hub: no route for {request.method} {path}"})
        repo, what, rest = route.groups()
        return getattr(self, what)(request, repo, rest or "")

    def refs(self, request, repo: str, rest: str):
        import httpx2

        heads = self.repos[repo].items()
        branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": oid} for n, oid in heads]
        return httpx2.Response(200, json={"branches": branches, "converts": [], "tags": []})

    def branch(self, request, repo: str, name: str):
        import httpx2

        heads = self.repos[repo]
        if request.method == "POST":
            if name in heads:
                return httpx2.Response(409, json={"error": f"Reference {name} already exists"})
            heads[name] = heads["main"]
            return httpx2.Response(200, json={})
        if self.delete_status != 200:
            return httpx2.Response(self.delete_status, json={"error": "fake hub: internal error"})
        if name == "main" or name not in heads:
            return httpx2.Response(403 if name == "main" else 404, json={"error": f"cannot delete {name}"})
        del heads[name]
        return httpx2.Response(200, json={})

    def preupload(self, request, repo: str, rest: str):
        import httpx2

        files = json.loads(request.content)["files"]
        return httpx2.Response(200, json={"files": [{"path": f["path"], "uploadMode": "regular",
                                                     "shouldIgnore": False} for f in files]})

    def commit(self, request, repo: str, revision: str):
        import httpx2

        if revision not in self.repos[repo]:
            return httpx2.Response(404, json={"error": f"Invalid rev id: {revision}"})
        lines = [json.loads(line) for line in request.content.decode().splitlines()]
        added = [ln["value"] for ln in lines if ln["key"] == "file"]
        files = {f["path"]: base64.b64decode(f["content"]) for f in added}
        self.commits.append({"path": request.url.path, "files": files, "header": lines[0]["value"]})
        oid = f"{len(self.commits):040d}"
        self.repos[repo][revision] = oid
        return httpx2.Response(200, json={"commitUrl": f"{ENDPOINT}/{repo}/commit/{oid}", "commitOid": oid,
                                          "pullRequestUrl": None})


@pytest.fixture
def hub(monkeypatch):
    import httpx2
    from huggingface_hub import constants, set_client_factory
    from huggingface_hub.utils._http import default_client_factory

    fake = FakeHub()
    monkeypatch.setenv("HF_TOKEN", "hf_fake_write_token")
    monkeypatch.setattr(constants, "ENDPOINT", ENDPOINT)
    set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(fake), follow_redirects=True))
    yield fake
    set_client_factory(default_client_factory)


def test_export_push_to_hub_uploads_the_hf_export_to_a_branch(hub, tiny_ckpt, capsys):
    assert main(["export", str(tiny_ckpt), "--push-to-hub", "me/tiny-smol", "--private", "--revision", "v1"]) == 0
    methods = [(m, p) for m, p, _ in hub.requests]
    assert ("POST", "/api/repos/create") in methods and ("POST", "/api/models/me/tiny-smol/branch/v1") in methods
    create = next(r for r in hub.requests if r[1] == "/api/repos/create")
    assert create[2]["authorization"] == "Bearer hf_fake_write_token"
    (commit,) = hub.commits
    assert commit["path"] == "/api/models/me/tiny-smol/commit/v1"
    files = commit["files"]
    assert {"model.safetensors", "config.json", "tokenizer.json", "generation_config.json", "README.md"} <= set(files)
    assert "manifest.json" not in files
    assert files["model.safetensors"] == (tiny_ckpt / "model.safetensors").read_bytes()
    assert "me/tiny-smol (revision v1)" in capsys.readouterr().out


def test_export_push_without_a_token_is_refused_before_any_work(tmp_path, tiny_ckpt, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no saved login either
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    assert main(["export", str(tiny_ckpt), "--push-to-hub", "me/tiny"]) == 2
    assert "HF_TOKEN" in capsys.readouterr().err


def test_checkpoint_push_to_hub_pushes_each_checkpoint_to_its_branch(hub, tmp_path, tiny_data):
    from smoltrain.config import load_config
    from smoltrain.train.trainer import Trainer

    pairs = [s for s in tiny_data if s != "--set"] + [f"run.dir={tmp_path / 'run'}", "train.max_steps=20",
                                                       "checkpoint.push_to_hub=me/run", "eval.prompts=[]"]
    Trainer(load_config(DEBUG_TINY, pairs)).train()
    assert [c["path"] for c in hub.commits] == ["/api/models/me/run/commit/step_00000010",
                                                "/api/models/me/run/commit/step_00000020"]
    weights = hub.commits[-1]["files"]["model.safetensors"]
    assert weights == (tmp_path / "run" / "checkpoints" / "step_00000020" / "model.safetensors").read_bytes()
    assert "loss.png" in hub.commits[-1]["files"] and "training" in hub.commits[-1]["files"]["README.md"].decode().lower()


STEPS = [f"step_{s:08d}" for s in (5, 10, 15, 20)]
USERS = {"main", "experiment", "step_1", "step_00000001_backup"}  # not step_ + exactly 8 digits: never ours


def train_pushing(hub, tmp_path, tiny_data, keep_last: int) -> int:
    """20 steps saving every 5 (four pushes) into me/run, which already has the user's branches."""
    hub.add_branches("me/run", *USERS - {"main"})
    sets = ["--set", f"run.dir={tmp_path / 'run'}", "--set", "train.max_steps=20",
            "--set", "checkpoint.every=5", "--set", f"checkpoint.keep_last={keep_last}",
            "--set", "checkpoint.push_to_hub=me/run", "--set", "eval.prompts=[]"]
    return main(["train", "--config", str(DEBUG_TINY), *tiny_data, *sets])


def test_keep_last_deletes_the_older_step_branches_on_the_hub(hub, tmp_path, tiny_data, capsys):
    assert train_pushing(hub, tmp_path, tiny_data, keep_last=2) == 0
    assert hub.branches("me/run") == USERS | {"step_00000015", "step_00000020"}
    deletes = [p for m, p, _ in hub.requests if m == "DELETE"]
    assert deletes == ["/api/models/me/run/branch/step_00000005", "/api/models/me/run/branch/step_00000010"]
    assert [c["path"].rsplit("/", 1)[1] for c in hub.commits] == STEPS  # every push happened first
    out = capsys.readouterr().out
    assert "hub: deleted branches step_00000005 of me/run (checkpoint.keep_last=2)" in out
    assert "hub: deleted branches step_00000010 of me/run (checkpoint.keep_last=2)" in out


def test_keep_last_0_keeps_every_step_branch(hub, tmp_path, tiny_data):
    assert train_pushing(hub, tmp_path, tiny_data, keep_last=0) == 0
    assert hub.branches("me/run") == USERS | set(STEPS)
    assert not [p for m, p, _ in hub.requests if m == "DELETE" or p.endswith("/refs")]


def test_a_failed_branch_cleanup_is_one_line_and_the_run_goes_on(hub, tmp_path, tiny_data, capsys):
    hub.delete_status = 500
    assert train_pushing(hub, tmp_path, tiny_data, keep_last=2) == 0
    assert hub.branches("me/run") == USERS | set(STEPS)
    assert [c["path"].rsplit("/", 1)[1] for c in hub.commits] == STEPS
    heads = {name: hub.repos["me/run"][name] for name in STEPS}
    assert heads == {name: f"{i + 1:040d}" for i, name in enumerate(STEPS)}  # each branch holds its push
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("hub: ")]
    assert len(errors) == 2, errors  # the pushes of steps 15 and 20 each found one branch to delete
    for line, pushed in zip(errors, STEPS[2:]):
        assert line.startswith(f"hub: deleting old branches of me/run on {ENDPOINT} failed: ")
        assert "'500 Internal Server Error'" in line
        assert "/api/models/me/run/branch/step_00000005" in line  # the first stale branch, the one refused
        assert line.endswith(f"({pushed} was pushed; the run goes on)")


def test_the_pushed_branch_is_never_a_stale_one():
    """A run resumed from an older checkpoint pushes a step below branches left by a longer run."""
    from smoltrain.hf.hub import stale_branches

    names = ["main", "step_00000030", "step_00000040", "step_00000010", "step_00000020", "step_123"]
    assert stale_branches(names, 2, "step_00000010") == ["step_00000020"]
    assert stale_branches(names, 0, "step_00000010") == []
