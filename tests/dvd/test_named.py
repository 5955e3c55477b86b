"""The one helper behind the name -> "module:Class" tables (commands, benchmarks, transports)."""

from __future__ import annotations

import pytest

from dvd.named import load, load_named
from dvd.transport import TransportConfig, TransportError, create_sender


def test_load_imports_a_module_or_its_attribute() -> None:
    import dvd.errors

    assert load("dvd.errors") is dvd.errors
    assert load("dvd.errors:DvdError") is dvd.errors.DvdError


def test_an_unknown_name_is_refused_naming_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown colour 'teal'; choose from \['blue', 'red'\]"):
        load_named({"red": "dvd.errors", "blue": "dvd.sampling"}, "teal", "colour")


def test_the_transport_table_resolves_through_it() -> None:
    with pytest.raises(TransportError, match="unknown transport kind 'carrier-pigeon'"):
        create_sender(TransportConfig(kind="carrier-pigeon"))
    assert type(create_sender(TransportConfig(kind="tcp"))).__name__ == "TcpSender"
