"""A vision server's allow-list (vision_server/destinations.py): only configured or announced language servers,
in one normalized form; anything else refused naming it; a malformed announcement refused whole."""

from __future__ import annotations

from pathlib import Path

import pytest

from dvd.errors import DestinationNotAllowedError, InvalidRequestError
from dvd.vision_server import destinations
from dvd.vision_server.config import VisionServerConfig
from dvd.vision_server.destinations import AllowList


def test_only_configured_or_announced_destinations_pass() -> None:
    allowed = AllowList(["10.0.0.2:7300"], "tcp")
    assert allowed.check("tcp://10.0.0.2:7300") == allowed.check("10.0.0.2:7300") == "tcp://10.0.0.2:7300"
    for other in ("tcp://10.0.0.2:7301", "rdma://10.0.0.2:7300", "169.254.169.254:80"):
        with pytest.raises(DestinationNotAllowedError, match="is not a language server") as refused:
            allowed.check(other)
        assert other in str(refused.value) and refused.value.grpc_code.name == "PERMISSION_DENIED"
    allowed.allow(["rdma://10.0.0.3:7300"])
    assert allowed.check("rdma://10.0.0.3:7300") and len(allowed) == 2
    with pytest.raises(InvalidRequestError, match="not \\[KIND://\\]HOST:PORT"):
        allowed.allow(["tcp://10.0.0.4:7300", "no-port"])
    assert len(allowed) == 2  # all or none


def test_an_inproc_receiver_is_named_without_host_or_port() -> None:
    allowed = AllowList([], "inproc")
    allowed.allow(["inproc://1"])  # the in-process receiver of tests and `dvd bench vision`
    assert allowed.check("inproc://1") == "inproc://1"
    with pytest.raises(DestinationNotAllowedError):
        allowed.check("inproc://2")
    with pytest.raises(InvalidRequestError):
        allowed.allow(["inproc://"])


def test_the_list_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(destinations, "MAX_DESTINATIONS", 3)
    allowed = AllowList(["a:1"], "tcp")
    allowed.allow(["a:1", "b:2", "c:3"])  # one already there: three in all
    with pytest.raises(InvalidRequestError, match="limit of 3"):
        allowed.allow(["d:4"])


def test_a_configured_destination_is_checked_when_the_config_is_built() -> None:
    assert VisionServerConfig(model=Path("m"), allowed_destinations=("10.0.0.2:7300",)).allowed_destinations
    with pytest.raises(ValueError, match=r"allowed_destinations\[1\]: destination '10.0.0.2' is not"):
        VisionServerConfig(model=Path("m"), allowed_destinations=("10.0.0.2:7300", "10.0.0.2"))
