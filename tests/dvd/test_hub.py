"""Checkpoints by Hub id (dvd/hub.py), with no network: a Hub cache laid out in a temp dir as huggingface_hub lays
it out, read with HF_HUB_OFFLINE=1, gives the same tokens as the directory (both formats) and the snapshot the
revision names; a fake Hub on loopback (HF_ENDPOINT) shows each role fetches only its files (the index says
which shard holds which tensor; never code); bad names are one line and exit 2 before any child starts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dvd.checkpoint import open_checkpoint, tensor_half
from dvd.hub import ROLE_FILES, weight_files
from tests.conftest import encode, photo_like
from tests.dvd.fake_hub import FakeHub, commit_of, lay_out_cache
from tests.serve_process import read_line

ROOT = Path(__file__).parents[2]
pytestmark = pytest.mark.slow


def _dvd(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dvd", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", **env})


def _offline(cache: Path) -> dict[str, str]:
    return {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """seed 0 in both formats, seed 1 (another revision), and seed 0 in many shards with a stray code file."""
    from dvd.tools.make_checkpoint import make_checkpoint

    root = tmp_path_factory.mktemp("hub-ckpt")
    out = {"hf": make_checkpoint(root / "hf", preset="tiny", fmt="hf", seed=0),
           "github": make_checkpoint(root / "github", preset="tiny", fmt="github", seed=0),
           "hf-seed1": make_checkpoint(root / "hf-seed1", preset="tiny", fmt="hf", seed=1),
           "sharded": make_checkpoint(root / "sharded", preset="tiny", fmt="hf", seed=0, shard_bytes=64 << 10)}
    (out["sharded"] / "modeling_internvl_chat.py").write_text("raise SystemExit('remote code ran')\n")
    not_internvl = root / "bert"
    not_internvl.mkdir()
    (not_internvl / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    out["bert"] = not_internvl
    return out


def _generate(model: str, image: Path, env: dict[str, str], *extra: str) -> list[int]:
    run = _dvd("generate", "--model", model, *extra, "--image", str(image), "--prompt", "Describe it.",
               "--max-new-tokens", "6", "--json", env=env)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])["token_ids"]


def test_a_hub_id_from_the_cache_offline_reads_as_its_directory(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    image = tmp_path / "image.png"
    image.write_bytes(encode(photo_like(320, 240, 3)))
    for fmt in ("hf", "github"):
        lay_out_cache(cache, f"org/tiny-{fmt}", {"main": checkpoints[fmt]})
        by_id = _generate(f"org/tiny-{fmt}", image, _offline(cache))
        assert by_id == _generate(str(checkpoints[fmt]), image, _offline(cache)), fmt


def test_a_pinned_revision_picks_its_snapshot(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    commits = lay_out_cache(cache, "org/tiny", {"v1": checkpoints["hf"], "main": checkpoints["hf-seed1"]})
    for revision, commit in (("", commits["main"]), ("v1", commits["v1"]), (commits["v1"], commits["v1"])):
        run = _dvd("download", "org/tiny", *(("--revision", revision) if revision else ()), env=_offline(cache))
        assert run.returncode == 0, run.stderr
        assert f"(revision {commit}) at {cache}/models--org--tiny/snapshots/{commit}" in run.stdout, run.stdout
    image = tmp_path / "image.png"
    image.write_bytes(encode(photo_like(320, 240, 4)))
    assert _generate("org/tiny", image, _offline(cache), "--revision", "v1") == \
        _generate(str(checkpoints["hf"]), image, _offline(cache))
    run = _dvd("download", "org/tiny", "--revision", "v2", env=_offline(cache))
    assert run.returncode == 2 and "revision v2 is not in the Hub cache" in run.stderr, run.stderr


def test_the_tensor_halves_are_what_each_half_loads(checkpoints: dict[str, Path]) -> None:
    from dvd.tensor_refs import JoinedRef, TensorSource
    from dvd.weights import language_tensors, vision_tensors

    source = TensorSource(checkpoints["sharded"])
    info = open_checkpoint(checkpoints["sharded"])
    for half, refs in (("vision", vision_tensors(info, source, with_flash=True)), ("language",
                                                                                   language_tensors(source))):
        keys = {k for r in refs.values() for k in ([p for g in r.parts for p in g] if isinstance(r, JoinedRef)
                                                   else [r.key])}
        assert keys and {tensor_half(k) for k in keys} == {half}
    vision, language = weight_files(checkpoints["sharded"], ["vision"]), weight_files(checkpoints["sharded"],
                                                                                     ["language"])
    assert vision and language and len(set(vision) | set(language)) >= len(vision) + len(language) - 1
    assert weight_files(checkpoints["hf"], ["vision"]) == ["*.safetensors"]  # one file holds both halves


def test_each_role_fetches_only_its_files(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    sharded = checkpoints["sharded"]
    expected = {role: {f for f in ROLE_FILES[role] if (sharded / f).exists()} | {"model.safetensors.index.json"}
                for role in ("vision", "language", "gateway")}
    expected["vision"] |= set(weight_files(sharded, ["vision"]))
    expected["language"] |= set(weight_files(sharded, ["language"]))
    for role in ("vision", "language", "gateway"):
        with FakeHub({"org/tiny": {"main": sharded}}) as hub:
            cache = tmp_path / role
            run = _dvd("download", "org/tiny", "--role", role, env={"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(cache)})
            assert run.returncode == 0, run.stderr
            assert set(hub.downloads()) == expected[role], role
            assert not any(path.endswith(".py") for _, path in hub.requests)  # never code
            assert "Fetching" in run.stderr  # huggingface_hub's progress bar
        snapshot = cache / "models--org--tiny" / "snapshots" / commit_of("org/tiny", sharded)
        assert {p.name for p in snapshot.iterdir()} == expected[role]
    # the vision node's cache serves a vision server offline, and not a language server: that half is not there
    offline = _offline(tmp_path / "vision")
    vision = subprocess.Popen([sys.executable, "-m", "dvd", "vision", "--model", "org/tiny", "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, **offline})
    try:
        assert "dvd vision serving on" in read_line(vision, 240)
    finally:
        vision.terminate()
        assert vision.wait(60) == 0
    run = _dvd("language", "--model", "org/tiny", "--port", "0", env=offline)
    assert run.returncode == 2 and "the Hub cache" in run.stderr and " lacks " in run.stderr, run.stderr
    assert "dvd download org/tiny --revision" in run.stderr and "--role language`" in run.stderr, run.stderr
    # with the language half's small files but not its shards: the shards are named
    (tmp_path / "vision").rename(tmp_path / "partial")
    partial = _offline(tmp_path / "partial")
    snapshot = tmp_path / "partial" / "models--org--tiny" / "snapshots" / commit_of("org/tiny", sharded)
    for name in expected["language"] - expected["vision"]:
        if not name.endswith(".safetensors"):
            (snapshot / name).write_bytes((sharded / name).read_bytes())
    run = _dvd("language", "--model", "org/tiny", "--port", "0", env=partial)
    assert run.returncode == 2 and re.search(r"lacks model-\d+-of-\d+\.safetensors", run.stderr), run.stderr


def test_dvd_plan_on_a_hub_id_reads_the_shards_headers_not_their_tensors(checkpoints: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    """The same plan as on the directory, from the config files, the index and each shard's header (HTTP
    range requests), sharded or one file; no shard is downloaded or cached."""
    plan = ["--devices", "2x1GiB", "--reserve", "100MiB", "--request-tokens", "256"]
    for name in ("sharded", "hf"):
        folder = checkpoints[name]
        local = _dvd("plan", "--model", str(folder), *plan, "--json", env={})
        assert local.returncode == 0, local.stderr
        shards = {f.name for f in folder.glob("*.safetensors")}
        with FakeHub({"org/tiny": {"main": folder}}) as hub:
            cache = tmp_path / name
            env = {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(cache)}
            by_id = _dvd("plan", "--model", "org/tiny", *plan, "--json", env=env)
            assert by_id.returncode == 0, by_id.stderr
            assert by_id.stdout == local.stdout
            assert not shards & set(hub.downloads()), hub.downloads()
            for shard in shards:  # of each shard, its 8-byte length and its header: nothing else
                with (folder / shard).open("rb") as handle:
                    header_bytes = 8 + int.from_bytes(handle.read(8), "little")
                assert hub.bytes_sent[shard] == header_bytes < (folder / shard).stat().st_size, shard
        snapshot = cache / "models--org--tiny" / "snapshots" / commit_of("org/tiny", folder)
        assert not shards & {p.name for p in snapshot.iterdir()}
    text = _dvd("plan", "--model", "org/tiny", *plan, env=_offline(tmp_path / "sharded"))  # offline: no shard
    assert text.returncode == 2 and "lacks model-" in text.stderr, text.stderr


def _one_line_and_nothing_started(run: subprocess.CompletedProcess[str], *expected: str) -> None:
    lines = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert run.returncode == 2 and len(lines) == 1, run.stderr
    assert all(e in lines[0] for e in expected), lines[0]
    assert "started" not in run.stdout + run.stderr and "dvd launch:" not in run.stdout


def test_bad_names_are_one_line_and_exit_2_before_any_child_starts(checkpoints: dict[str, Path],
                                                                    tmp_path: Path) -> None:
    repos = {"org/gated": {"main": checkpoints["hf"]}, "org/bert": {"main": checkpoints["bert"]}}
    with FakeHub(repos, gated=frozenset({"org/gated"})) as hub:
        online = {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_TOKEN": ""}
        run = _dvd("serve", "--model", "org/missing", env=online)
        _one_line_and_nothing_started(run, "org/missing", "no such model on the Hub")
        run = _dvd("serve", "--model", "org/gated", env=online)
        _one_line_and_nothing_started(run, "org/gated", "gated", "no HF_TOKEN is set")
        run = _dvd("serve", "--model", "org/gated", env={**online, "HF_TOKEN": "hf_secret0123456789"})
        _one_line_and_nothing_started(run, "org/gated", "HF_TOKEN does not give access")
        assert "hf_secret0123456789" not in run.stdout + run.stderr  # never logged
        run = _dvd("serve", "--model", "org/bert", env=online)
        _one_line_and_nothing_started(run, "org/bert", "not an InternVL checkpoint", "BertModel")
    run = _dvd("serve", "--model", "org/tiny", env=_offline(tmp_path / "empty"))
    _one_line_and_nothing_started(run, "org/tiny", "not in the Hub cache", "HF_HUB_OFFLINE", "dvd download org/tiny",
                                  "a local checkpoint directory")
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("model: org/tiny\nnodes:\n  - {name: a, address: 127.0.0.1, gateway: {}, "
                       "language: {}}\n")
    run = _dvd("launch", str(cluster), env=_offline(tmp_path / "empty"))
    _one_line_and_nothing_started(run, "org/tiny", "not in the Hub cache")
    run = _dvd("serve", "--model", "not/a/path", env=_offline(tmp_path / "empty"))
    _one_line_and_nothing_started(run, "not/a/path", "not a checkpoint directory, nor a Hugging Face Hub id")


def test_dvd_serve_by_hub_id_offline_equals_monolithic_and_reports_its_commit(
        checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import base64
    import urllib.request

    import torch
    from transformers import InternVLForConditionalGeneration

    from dvd.pipeline.detokenize import answer_text
    from dvd.pipeline.local import LocalPipeline
    from dvd.sampling import greedy
    from tests.pipeline.test_split_equals_monolithic import NEW_TOKENS, monolithic_reference
    from tests.serve_process import ServeProcess, post_chat

    cache = tmp_path / "hub"
    commit = lay_out_cache(cache, "org/tiny", {"main": checkpoints["hf"]})["main"]
    for key, value in _offline(cache).items():
        monkeypatch.setenv(key, value)  # ServeProcess's child inherits them: no network, only the laid-out cache
    image = encode(photo_like(640, 480, 5), "JPEG")
    pipe = LocalPipeline(checkpoints["hf"])
    monolithic = InternVLForConditionalGeneration.from_pretrained(str(checkpoints["hf"]), dtype=torch.float32).eval()
    sampling = greedy(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, stop_token_ids=pipe.chat.stop_token_ids)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    prompt_ids = pipe.generate(messages, [image], sampling).prompt_token_ids
    expected = answer_text(pipe.chat, monolithic_reference(monolithic, pipe, prompt_ids, [image], bf16=True))
    url = "data:image/jpeg;base64," + base64.b64encode(image).decode()
    body = {"model": "tiny", "max_tokens": NEW_TOKENS, "min_tokens": NEW_TOKENS, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "Describe it."}]}]}
    with ServeProcess("--model", "org/tiny") as served:
        status, answer = post_chat(served.http_url, body)
        assert status == 200, answer
        assert answer["choices"][0]["message"]["content"] == expected
        with urllib.request.urlopen(served.http_url + "/v1/instances", timeout=30) as response:
            roster = json.loads(response.read())["data"]
        assert len(roster) == 2 and all(entry["revision"] == commit for entry in roster), roster
        assert f"resolved to commit {commit}" in served.output  # logged once, by the front-end
    assert served.leftover_children == [], served.output


def test_dvd_cluster_up_pins_the_commit_and_leaves_the_weights_to_each_actor(
        checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dvd.deploy.cluster_cmd import for_up
    from dvd.deploy.ray_config import RayClusterConfig
    from dvd.token_file import write_token_file

    cache = tmp_path / "hub"  # the driver's node holds the config files only: `up` fetches no weights
    commits = lay_out_cache(cache, "org/tiny", {"main": checkpoints["hf"]}, skip=("model.safetensors",))
    from huggingface_hub import constants  # read from the environment once, at its import: set here instead

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    write_token_file(tmp_path / "token", "cluster-secret")
    config, token = for_up(RayClusterConfig(model=Path("org/tiny"), token_file=tmp_path / "token"))
    assert token == "cluster-secret"
    assert config.model == Path("org/tiny") and config.revision == commits["main"]  # every actor: this commit


def test_a_hub_snapshot_is_served_by_its_hub_id(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """What clients call a model from the Hub is its id as given, as vLLM serves it (`model="org/name"`); the bare
    name stays accepted (pipeline/serving.py: served_names)."""
    from dvd.hub import resolve_model
    from dvd.pipeline.serving import served_names

    commits = lay_out_cache(tmp_path / "hub", "org/tiny", {"main": checkpoints["hf"]})
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / commits["main"]
    model = resolve_model(snapshot)
    assert (model.name, model.revision) == ("org/tiny", commits["main"])
    assert served_names(model.name) == ["org/tiny", "tiny"]
    assert resolve_model(checkpoints["hf"]).name == "hf"
    assert served_names("hf") == ["hf"]
