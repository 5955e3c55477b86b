"""Image URLs a server with remote URLs enabled may still not follow (SSRF guard)."""

from __future__ import annotations

import urllib.request

import pytest

from dvd.errors import InvalidRequestError
from dvd.pipeline.openai_parse import _CheckedRedirects, check_fetchable, decode_image_url
from dvd.pipeline.validate import ApiLimits

REMOTE = ApiLimits(allow_remote_urls=True)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/x.png", "http://localhost:8000/x.png", "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.1/x.png", "http://192.168.1.1/x.png", "http://[::1]/x.png", "http://[fe80::1]/x.png",
    "http://0.0.0.0/x.png", "http://224.0.0.1/x.png", "https:///x.png", "ftp://8.8.8.8/x.png",
])
def test_private_and_odd_urls_are_refused(url: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        check_fetchable(url, "messages[0].content[0].image_url", REMOTE)
    assert caught.value.http_status == 400 and caught.value.param == "messages[0].content[0].image_url"


def test_a_redirect_to_a_private_address_is_refused() -> None:
    handler = _CheckedRedirects("at", REMOTE)
    request = urllib.request.Request("http://8.8.8.8/x.png")
    with pytest.raises(InvalidRequestError, match=r"169\.254\.169\.254"):
        handler.redirect_request(request, None, 302, "Found", {}, "http://169.254.169.254/latest/meta-data/")


def test_private_addresses_only_when_allowed_and_files_only_when_enabled() -> None:
    check_fetchable("http://127.0.0.1/x.png", "at", ApiLimits(allow_remote_urls=True, allow_private_urls=True))
    for url in ("file:///etc/passwd", "/etc/passwd", "http://8.8.8.8/x.png"):
        with pytest.raises(InvalidRequestError, match="disabled"):
            decode_image_url(url, "at", ApiLimits())
