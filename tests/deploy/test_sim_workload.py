"""What `dvd plan --simulate` sends: generated workloads (arrivals, tiles of each image size) and JSONL traces
as `dvd bench serve` takes them, a bad trace refused naming the file, line and field."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from dvd.deploy.sim_workload import WorkloadSpec, arrival_times, from_trace, generate, tiles_for
from tests.conftest import encode, photo_like


def test_tiles_follow_the_model_cards_dynamic_tiling() -> None:
    assert [tiles_for(448, 448), tiles_for(896, 896), tiles_for(1344, 1344)] == [1, 5, 10]  # RESULTS.md's buckets
    assert tiles_for(1344, 448) == 4  # 3 x 1 + thumbnail
    assert tiles_for(4000, 4000, max_tiles=4) == 5


def test_arrivals_are_poisson_fixed_or_all_at_once() -> None:
    gaps = np.diff(arrival_times(200_000, 4.0, "poisson", seed=1))
    assert gaps.mean() == pytest.approx(0.25, rel=0.01) and gaps.std() == pytest.approx(0.25, rel=0.02)
    assert arrival_times(4, 2.0, "fixed", seed=0).tolist() == [0.0, 0.5, 1.0, 1.5]
    assert arrival_times(3, float("inf"), "poisson", seed=0).tolist() == [0.0, 0.0, 0.0]


def test_generated_requests() -> None:
    spec = WorkloadSpec(num_requests=1000, image_sizes=((448, 448), (1344, 1344)), images_per_request=2,
                        prompt_tokens=30, prefix_tokens=10, output_tokens=7)
    requests = generate(spec)
    assert len(requests) == 1000 and requests.image_start[-1] == 2000
    assert set(requests.image_tiles.tolist()) == {1, 10}
    assert (requests.prefix_tokens == 10).all() and (requests.text_tokens == 20).all()
    assert (requests.output_tokens == 7).all()
    with pytest.raises(ValueError, match="prefix_tokens"):
        WorkloadSpec(prompt_tokens=4, prefix_tokens=5)


def _data_url(width: int, height: int) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(encode(photo_like(width, height), "JPEG")).decode()


def _line(content: object, **extra: object) -> str:
    return json.dumps({"messages": [{"role": "user", "content": content}], **extra})


def test_a_trace_becomes_requests_cycled_to_the_count(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    image = {"type": "image_url", "image_url": {"url": _data_url(896, 896)}}
    trace.write_text("\n".join([
        _line([{"type": "text", "text": "x" * 40}, image, {"type": "text", "text": "y" * 8}], max_tokens=5),
        "",
        _line("just text, twenty-six chars"),
    ]) + "\n")
    requests = from_trace(trace, WorkloadSpec(num_requests=5, output_tokens=9, rate=2.0, arrival="fixed"))
    assert requests.prefix_tokens.tolist() == [10, 0, 10, 0, 10]  # 40 characters before the image: 10 tokens
    assert requests.text_tokens.tolist() == [2, 7, 2, 7, 2]
    assert requests.output_tokens.tolist() == [5, 9, 5, 9, 5]
    assert requests.image_tiles.tolist() == [5, 5, 5] and requests.image_start.tolist() == [0, 1, 1, 2, 2, 3]
    assert requests.arrivals.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0]


@pytest.mark.parametrize(("line", "error"), [
    ("{not json", r"--trace .*trace.jsonl: line 2: not valid JSON"),
    (_line("x", tools=[]), r"line 2: field\(s\) tools not supported"),
    (_line([{"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}]),
     r"line 2: messages\[0\].content\[0\].image_url.url: not valid base64"),
    (_line([{"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}}]),
     r"line 2: messages\[0\].content\[0\].image_url.url: the simulator reads image sizes from data: URLs and "
     "local files only"),
    (_line([{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]),
     r"line 2: messages\[0\].content\[0\].image_url.url: not a readable image"),
])
def test_a_malformed_trace_is_refused_naming_file_line_and_field(tmp_path: Path, line: str, error: str) -> None:
    trace = tmp_path / "trace.jsonl"
    trace.write_text(_line("fine") + "\n" + line + "\n")
    with pytest.raises(ValueError, match=error):
        from_trace(trace, WorkloadSpec(num_requests=2))


def test_local_image_files_are_read_too(tmp_path: Path) -> None:
    (tmp_path / "wide.png").write_bytes(encode(photo_like(1344, 448)))
    trace = tmp_path / "trace.jsonl"
    trace.write_text(_line([{"type": "image_url", "image_url": {"url": str(tmp_path / "wide.png")}}]) + "\n")
    assert from_trace(trace, WorkloadSpec(num_requests=1)).image_tiles.tolist() == [4]
