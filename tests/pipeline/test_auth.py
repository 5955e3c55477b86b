"""API keys: where they come from, what is accepted, and that they never show."""

from __future__ import annotations

from pathlib import Path

import pytest

from dvd.errors import UnauthenticatedError
from dvd.pipeline.auth import ApiKeys, is_loopback, load_api_keys

A, B = "key-a-0123456789abcdef", "key-b-0123456789abcdef"


def test_keys_from_a_file_and_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# comment\n{A}\n\n  {B}  \n")
    keys = load_api_keys(path, environ={"DVD_API_KEY": "key-c-0123456789abcdef"})
    assert keys.keys == (A.encode(), B.encode(), b"key-c-0123456789abcdef")
    assert not load_api_keys(None, environ={}).enabled
    assert A not in repr(keys) and "3 key(s)" in repr(keys)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "short\n", "has a space in it 0123456789\n"])
def test_bad_key_files_are_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "keys"
    path.write_text(text)
    with pytest.raises(ValueError) as caught:
        load_api_keys(path, environ={})
    assert "API key file" in str(caught.value)
    assert "short" not in str(caught.value) and "space in it" not in str(caught.value)  # no key echoed


def test_only_a_bearer_header_with_a_configured_key_is_accepted() -> None:
    keys = ApiKeys((A.encode(), B.encode()))
    assert keys.accepts(f"Bearer {A}") and keys.accepts(f"bearer {B}")
    for presented in (None, "", A, f"Basic {A}", f"Bearer {A[:-1]}", f"Bearer {A}x", "Bearer ", "Bearer \udcff"):
        assert not keys.accepts(presented)
    with pytest.raises(UnauthenticatedError) as caught:
        keys.check(f"Bearer wrong-{A}")
    assert A not in str(caught.value) and caught.value.http_status == 401
    assert ApiKeys().accepts(None)  # no keys configured: authentication off


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("::1", True), ("localhost", True),
                                                 ("0.0.0.0", False), ("::", False), ("10.1.2.3", False)])
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
