"""`dvd serve --config`: a bad file stops it before any process starts, naming the key; a good one
reaches the servers it starts (their own Health and Stats show it); and the gateway of a
disaggregated deployment never loads torch."""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import sys
from pathlib import Path

import grpc
import psutil
import pytest

from dvd.v1 import common_pb2, language_pb2_grpc
from tests.serve_process import ServeProcess, post_chat, signed

ROOT = Path(__file__).parents[2]
_STARTED = re.compile(r"started (vision|language) server \(pid (\d+)\) on ([\d.]+:\d+)")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("language:\n  engine:\n    num_blocks: lots\n", "language.engine.num_blocks: expected int, got str"),
        ("vision:\n  max_batch_tile: 8\n", "vision.max_batch_tile: unknown key; allowed here:"),
        ("transport:\n  kind: carrier-pigeon\n", "transport.kind: must be one of tcp, rdma"),
        ("language: [1, 2]\n", "language: expected a mapping"),
        ("{{not yaml", "is not valid YAML"),
    ],
)
def test_a_bad_config_fails_before_any_process_starts(tmp_path: Path, tiny_hf: Path, text: str,
                                                      needle: str) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text(text)
    run = subprocess.run([sys.executable, "-m", "dvd", "serve", "--config", str(path), "--model", str(tiny_hf),
                          "--port", "0", "--grpc-port", "0"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 2, run.stderr
    assert needle in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert "started" not in run.stderr + run.stdout  # no vision or language server was launched


def test_a_flag_that_is_not_a_config_key_value_fails_the_same_way(tiny_hf: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "dvd", "serve", "--model", str(tiny_hf), "--num-blocks", "1",
                          "--port", "0", "--grpc-port", "0"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 2 and "language.engine: num_blocks must be >= 2, got 1" in run.stderr, run.stderr


@pytest.mark.parametrize(("config", "needle"), [
    ('{"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}', "unsupported architecture 'Qwen3ForCausalLM'"),
    ("[1, 2]", "config.json: expected a JSON object, got list"),
])
def test_a_directory_that_is_not_an_internvl_checkpoint_fails_before_any_process_starts(
        tmp_path: Path, config: str, needle: str, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    from dvd.cli import main

    caplog.set_level(logging.INFO)
    (tmp_path / "config.json").write_text(config)
    assert main(["serve", "--model", str(tmp_path), "--port", "0", "--grpc-port", "0"]) == 2
    assert needle in capsys.readouterr().err
    assert "started" not in caplog.text  # no vision or language server was launched


def _libraries(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_config_reaches_the_servers_and_the_gateway_has_no_torch(tmp_path: Path, tiny_hf: Path) -> None:
    pytest.importorskip("ucxx")
    path = tmp_path / "serve.yaml"
    path.write_text("transport:\n  kind: rdma\n  ucx_tls: tcp\n"
                    "language:\n  engine:\n    num_blocks: 321\n    block_size: 16\n"
                    "vision:\n  max_batch_tiles: 3\n  cache_bytes: 0\n")
    with ServeProcess("--config", str(path), "--model", str(tiny_hf)) as served:
        started = {kind: address for kind, _, address in _STARTED.findall(served.output)}
        assert set(started) == {"vision", "language"}, served.output
        with grpc.insecure_channel(started["language"]) as channel:
            stub = language_pb2_grpc.LanguageStub(channel)
            health = stub.Health(common_pb2.HealthRequest(), timeout=30)
            stats = stub.Stats(common_pb2.StatsRequest(), timeout=30,
                               metadata=signed(served.cluster_token(), "/dvd.v1.Language/Stats")).counters
        assert health.transport_address.startswith("rdma://"), health
        assert "of 321 blocks used (5136 tokens)" in health.detail, health.detail
        assert stats["num_kv_blocks"] == 321
        # a request with an image crosses the rdma stream and is answered
        image = (ROOT / "tests" / "fixtures" / "images").glob("*.jpg")
        data = next(image).read_bytes()
        import base64

        url = "data:image/jpeg;base64," + base64.b64encode(data).decode()
        status, answer = post_chat(served.http_url, {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]}],
            "max_tokens": 3, "temperature": 0})
        assert status == 200, answer
        # the gateway process: tokenizer and chat template only, no torch loaded
        gateway_maps = _libraries(served.proc.pid)
        assert "libtorch" not in gateway_maps
        children = served.children()
        assert children and all("libtorch" in _libraries(c.pid) for c in children)  # the test can see it
        token_files = list(Path("/tmp").glob("dvd-serve-*/*.yaml"))
        assert all(f.stat().st_mode & 0o077 == 0 for f in token_files)  # child configs: this user only
        for child in children:
            assert not any(re.fullmatch(r"[0-9a-f]{32}", arg) for arg in child.cmdline())  # no token in argv
    assert served.leftover_children == [] and not psutil.pid_exists(served.proc.pid)


class _Exited:
    """A supervised child that has exited, as Supervisor.watch hands it over."""

    def __init__(self, name: str, address: str, code: int) -> None:
        self.name, self.address, self.returncode = name, address, code

    def describe(self) -> str:
        return f"{self.name} (pid 1, {self.address})"


def test_a_server_that_exits_is_said_with_what_it_leaves(caplog: pytest.LogCaptureFixture) -> None:
    from dvd.deploy.serve_cmd import _exited
    from dvd.pipeline.replicas import attached

    async def main() -> None:
        pools = {"language": attached("language", ["127.0.0.1:7200", "127.0.0.1:7201"])}
        replicas = {f"language[{i}]": pools["language"].replicas[i] for i in range(2)}
        _exited(_Exited("language[0]", "127.0.0.1:7200", -9), replicas, pools)  # type: ignore[arg-type]
        assert "1 language server(s) still serve" in caplog.text
        _exited(_Exited("language[1]", "127.0.0.1:7201", -9), replicas, pools)  # type: ignore[arg-type]
        assert "no language server is left, so requests that need one get 503 until dvd serve is restarted" \
            in caplog.text
        assert "dvd serve does not restart its servers" in caplog.text

    asyncio.run(main())
