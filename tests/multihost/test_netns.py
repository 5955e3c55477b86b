"""Multi-host on one machine: gateway, vision servers and language server each in their own network
namespace, joined by veth pairs and a bridge, links capped at 1 Gbit/s (and delayed where sch_netem
exists; the test prints which ran). Requests through `dvd gateway` equal the single-machine greedy
output; a vision server started later joins and takes part of the load; taking a vision server's
link down fails the request in flight to it with an error naming it, well within the request's deadline,
and takes it out of rotation; bringing the link back re-admits it, nothing restarted."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from dvd.pipeline.detokenize import answer_text
from dvd.token_file import write_token_file
from tests.conftest import encode, photo_like
from tests.multihost.harness import Agent, NsProcess, wait_for
from tests.multihost.netns import Topology, can_run
from tests.pipeline.test_gateway import IMAGE, NEW, _expected, _internal_messages, _openai_messages
from tests.pipeline.test_gateway import reference as reference

pytestmark = [pytest.mark.skipif(bool(can_run()), reason=can_run() or "runs"), pytest.mark.slow]

HOSTS = ["gw", "vis1", "vis2", "lang"]
API_KEY = "multihost-test-api-key-0123456789"
VISION_PORT, LANGUAGE_PORT, TRANSPORT_PORT, HTTP_PORT, GRPC_PORT = 7100, 7200, 7300, 8000, 50051
DEADLINE_S = 60.0


def _body(image: bytes, **extra: object) -> dict:
    url = "data:image/jpeg;base64," + base64.b64encode(image).decode()
    messages = _openai_messages() if image is IMAGE else [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]}]
    return {"model": "tiny-hf", "messages": messages, "max_tokens": NEW, "temperature": 0, "min_tokens": NEW,
            "timeout": DEADLINE_S, **extra}


class Cluster:
    def __init__(self, net: Topology, model: Path, token: Path, api_keys: Path) -> None:
        self.net, self.model, self.token, self.api_keys = net, model, token, api_keys
        self.processes: list[NsProcess] = []
        self.url = f"http://{net.ip('gw')}:{HTTP_PORT}"
        self.vis2: NsProcess | None = None

    def vision(self, host: str, *extra: str) -> NsProcess:
        return self._start(host, ["-m", "dvd", "vision", "--model", str(self.model), "--host", self.net.ip(host),
                                  "--port", str(VISION_PORT), "--token-file", str(self.token), *extra],
                           "dvd vision serving on")

    def second_vision(self) -> None:
        """vis2 started (once: the first test that needs it starts it, the others find it) and in rotation, so
        each test that uses two vision servers also runs alone."""
        if self.vis2 is None:
            self.vis2 = self.vision("vis2", "--cache-mib", "0")
        wait_for(lambda: self.vision_entry(self.agent, "vis2")["healthy"], 30, "vis2 in rotation")

    def language(self) -> NsProcess:
        return self._start("lang", ["-m", "dvd", "language", "--model", str(self.model), "--host", "0.0.0.0",
                                    "--advertise-host", self.net.ip("lang"), "--port", str(LANGUAGE_PORT),
                                    "--transport-port", str(TRANSPORT_PORT), "--token-file", str(self.token)],
                           "dvd language serving on")

    def gateway(self) -> NsProcess:
        vision = ",".join(f"{self.net.ip(h)}:{VISION_PORT}" for h in ("vis1", "vis2"))
        return self._start("gw", ["-m", "dvd", "gateway", "--model", str(self.model), "--vision", vision,
                                  "--language", f"{self.net.ip('lang')}:{LANGUAGE_PORT}", "--host", self.net.ip("gw"),
                                  "--port", str(HTTP_PORT), "--grpc-port", str(GRPC_PORT), "--probe-interval", "0.5",
                                  "--probe-timeout", "2", "--fail-threshold", "3",
                                  "--api-key-file", str(self.api_keys), "--token-file", str(self.token)],
                           "dvd gateway: ready")

    def _start(self, host: str, args: list[str], ready: str) -> NsProcess:
        process = NsProcess(self.net.exec_prefix(host), args, ready)
        self.processes.append(process)
        return process

    def roster(self, agent: Agent) -> dict[str, dict]:
        return {entry["address"]: entry for entry in agent.get(self.url + "/v1/instances")["data"]}

    def vision_entry(self, agent: Agent, host: str) -> dict:
        return self.roster(agent)[f"{self.net.ip(host)}:{VISION_PORT}"]


@pytest.fixture(scope="module")
def cluster(tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory):
    token = tmp_path_factory.mktemp("secret") / "token"
    write_token_file(token, "multihost-test-token")
    api_keys = token.parent / "api-keys"  # the gateway binds a namespace address, beyond loopback: a key
    api_keys.write_text(API_KEY + "\n")
    with Topology(HOSTS) as net:
        print(f"\nmultihost links: {net.shaping}")
        cluster = Cluster(net, tiny_hf, token, api_keys)
        agent = None
        try:
            cluster.language()
            cluster.vision("vis1", "--cache-mib", "0")
            cluster.gateway()  # vis2 is listed but not started: out of rotation until it answers
            agent = Agent(net.exec_prefix("gw"), api_key=API_KEY)
            cluster.agent = agent
            yield cluster
        finally:
            if agent is not None:
                agent.close()
            codes = [p.stop() for p in reversed(cluster.processes)]
            outputs = "\n".join(p.output for p in cluster.processes)
        assert all(p.proc.poll() is not None for p in cluster.processes)
        assert codes == [0] * len(codes), outputs
    assert not net.namespaces()


def test_requests_through_the_gateway_equal_single_machine(cluster: Cluster, reference: tuple) -> None:
    expected = answer_text(reference[0].chat, _expected(reference, _internal_messages(), [IMAGE]))
    answers = [cluster.agent.chat(cluster.url, _body(IMAGE)) for _ in range(2)]
    for answer in (a.result(timeout=120) for a in answers):
        assert answer["status"] == 200, answer
        assert answer["body"]["choices"][0]["message"]["content"] == expected
    roster = cluster.roster(cluster.agent)
    lang = roster[f"{cluster.net.ip('lang')}:{LANGUAGE_PORT}"]
    assert lang["healthy"] and lang["transport_address"] == f"tcp://{cluster.net.ip('lang')}:{TRANSPORT_PORT}"
    assert cluster.vision_entry(cluster.agent, "vis1")["healthy"]
    assert not cluster.vision_entry(cluster.agent, "vis2")["healthy"]  # listed, not started yet


def test_link_down_fails_the_request_in_flight_then_link_up_readmits(cluster: Cluster) -> None:
    """vis1 is the only vision server in rotation: its request cannot go elsewhere, and must fail
    with an error naming it, well before the request's deadline."""
    agent, net = cluster.agent, cluster.net
    net.link("vis1", up=False)
    try:
        pending = agent.chat(cluster.url, _body(encode(photo_like(300, 200, 40), "JPEG")))
        answer = pending.result(timeout=DEADLINE_S + 30)
        assert answer["status"] == 503, answer
        message = answer["body"]["error"]["message"]
        assert f"{net.ip('vis1')}:{VISION_PORT}" in message, message
        assert answer["elapsed_s"] < DEADLINE_S / 2, answer  # the probes or the dead link, not the deadline
        wait_for(lambda: not cluster.vision_entry(agent, "vis1")["healthy"], 30, "vis1 out of rotation")
        entry = cluster.vision_entry(agent, "vis1")
        assert "health probes in a row failed" in entry["state"], entry
        text_only = {**_body(IMAGE), "messages": [{"role": "user", "content": "Hello"}]}
        assert agent.chat(cluster.url, text_only).result(timeout=120)["status"] == 200  # language still serves
    finally:
        net.link("vis1", up=True)
    wait_for(lambda: cluster.vision_entry(agent, "vis1")["healthy"], 30, "vis1 back in rotation")
    answer = agent.chat(cluster.url, _body(encode(photo_like(300, 200, 41), "JPEG"))).result(timeout=120)
    assert answer["status"] == 200, answer


def test_a_vision_server_started_later_joins_and_takes_load(cluster: Cluster) -> None:
    cluster.second_vision()
    before = {h: cluster.vision_entry(cluster.agent, h)["counters"].get("num_requests_ok", 0) for h in ("vis1", "vis2")}
    images = [encode(photo_like(320, 240, seed), "JPEG") for seed in range(4)]
    answers = [cluster.agent.chat(cluster.url, _body(image)) for image in images]
    assert [a.result(timeout=120)["status"] for a in answers] == [200] * 4

    def served() -> dict[str, float] | None:
        now = {h: cluster.vision_entry(cluster.agent, h)["counters"].get("num_requests_ok", 0) - before[h]
               for h in before}
        return now if sum(now.values()) == len(images) else None

    share = wait_for(served, 10, "the probes' counters to show every request")
    assert share["vis1"] >= 1 and share["vis2"] >= 1, share


def test_link_down_with_two_servers_moves_the_work_and_readmits(cluster: Cluster) -> None:
    """Requests caught on vis1 when its link goes down are retried on vis2 (an Encode that never
    reached its server) or failed by the probes with an error naming vis1; vis1 leaves the rotation
    and comes back when its link does, nothing restarted."""
    agent, net = cluster.agent, cluster.net
    cluster.second_vision()
    net.link("vis1", up=False)
    try:
        # both idle: least-outstanding sends one to each; vis1's hangs on the dead link
        hold = [agent.chat(cluster.url, _body(encode(photo_like(300, 200, 50 + i), "JPEG"))) for i in range(2)]
        answers = [h.result(timeout=DEADLINE_S + 30) for h in hold]
        for answer in answers:
            if answer["status"] != 200:
                assert answer["status"] == 503 and f"{net.ip('vis1')}:{VISION_PORT}" in \
                    answer["body"]["error"]["message"], answer
            assert answer["elapsed_s"] < DEADLINE_S, answer
        wait_for(lambda: not cluster.vision_entry(agent, "vis1")["healthy"], 30, "vis1 out of rotation")
        answer = agent.chat(cluster.url, _body(encode(photo_like(300, 200, 60), "JPEG"))).result(timeout=120)
        assert answer["status"] == 200, answer  # vis2 serves on
    finally:
        net.link("vis1", up=True)
    wait_for(lambda: cluster.vision_entry(agent, "vis1")["healthy"], 30, "vis1 back in rotation")
    before = cluster.vision_entry(agent, "vis1")["counters"].get("num_requests_ok", 0)
    answers = [agent.chat(cluster.url, _body(encode(photo_like(300, 200, 70 + i), "JPEG"))) for i in range(2)]
    assert [a.result(timeout=120)["status"] for a in answers] == [200, 200], answers
    wait_for(lambda: cluster.vision_entry(agent, "vis1")["counters"].get("num_requests_ok", 0) > before, 10,
             "vis1 serving again after its link came back")
