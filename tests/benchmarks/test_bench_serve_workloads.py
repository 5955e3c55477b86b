"""`dvd bench serve`'s folder and jsonl workloads: what they send, and how they refuse bad input."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from dvd.benchmarks.serve_client import chat_body, grpc_messages
from dvd.benchmarks.serve_workload import (
    ChatJsonlWorkload,
    ImageFolderWorkload,
    PlannedRequest,
    Workload,
    WorkloadOptions,
    build_workload,
    repeated_images,
)

IMAGES = Path(__file__).parents[1] / "fixtures" / "images"


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("rocket_640x427.jpg", "chelsea_cat_451x300.jpg", "coffee_600x400.jpg"):
        (folder / name).write_bytes((IMAGES / name).read_bytes())
    (folder / "notes.txt").write_text("not a picture")
    (folder / "broken.jpg").write_bytes((IMAGES / "coffee_600x400.jpg").read_bytes()[:2000])  # truncated
    (folder / ".DS_Store").write_bytes(b"\0\1")  # hidden: not even mentioned
    (folder / "sub").mkdir()  # subfolders are not read
    return folder


def test_folder_sends_every_readable_image_sorted_and_cycled(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    workload = build_workload("folder", WorkloadOptions(path=folder, num_prompts=5, output_len=3, seed=1))
    assert isinstance(workload, ImageFolderWorkload)
    assert [image.name for image in workload.images] == ["chelsea_cat_451x300.jpg", "coffee_600x400.jpg",
                                                        "rocket_640x427.jpg"]
    skipped = dict(workload.skipped)
    assert set(skipped) == {"broken.jpg", "notes.txt"}
    assert "truncated" in skipped["broken.jpg"] and "not an image file" in skipped["notes.txt"]
    requests = workload.plan_round(0)
    assert len(requests) == 5
    sent = [r.images[0] for r in requests]
    assert sent[3] == sent[0] and sent[4] == sent[1]  # cycled in name order
    assert sent[0].startswith("data:image/jpeg;base64,")
    assert base64.b64decode(sent[0].partition(",")[2]) == (IMAGES / "chelsea_cat_451x300.jpg").read_bytes()
    assert all(r.output_len == 3 and r.exact_output and r.prompt.startswith("Describe") for r in requests)
    assert repeated_images([requests]) == 2 and repeated_images([requests, workload.plan_round(1)]) == 7
    warm = {url for r in workload.warmups(2) for url in r.images}
    assert len(warm) == 2 and not warm & set(sent)  # warm-ups never put a folder image in the encoder cache
    assert {"dataset", "files", "skipped"} <= workload.describe().keys()
    assert "3 image(s), 2 file(s) skipped" in workload.summary()

    pairs = build_workload("folder", WorkloadOptions(path=folder, num_prompts=2, images_per_request=2,
                                                     prompt="What is it?"))
    first, second = pairs.plan_round(0)
    assert first.prompt == "What is it?" and len(first.images) == 2 and second.images[0] == sent[2]


def test_folder_refuses_what_it_cannot_use(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs --dataset-path"):
        build_workload("folder", WorkloadOptions())
    with pytest.raises(ValueError, match="not a folder"):
        build_workload("folder", WorkloadOptions(path=tmp_path / "missing"))
    (tmp_path / "a.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(ValueError, match=r"no readable image in the folder \(a.png: not an image file"):
        build_workload("folder", WorkloadOptions(path=tmp_path))
    with pytest.raises(ValueError, match="not random-mm"):
        build_workload("random-mm", WorkloadOptions(path=tmp_path))


def _write_jsonl(path: Path, lines: list[object]) -> Path:
    path.write_text("".join((json.dumps(line) if not isinstance(line, str) else line) + "\n" for line in lines))
    return path


def test_jsonl_lines_become_requests_as_written(tmp_path: Path) -> None:
    picture = "data:image/jpeg;base64," + base64.b64encode((IMAGES / "rocket_640x427.jpg").read_bytes()).decode()
    path = _write_jsonl(tmp_path / "r.jsonl", [
        {"model": "gpt-x", "stream": False, "max_completion_tokens": 4, "temperature": 0,
         "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": picture}},
                                                   {"type": "text", "text": "What is this?"}]}]},
        "",  # blank lines are skipped
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
         "max_tokens": 3},
        {"messages": [{"role": "user", "content": "A story."}], "temperature": 0.7},
    ])
    workload = build_workload("jsonl", WorkloadOptions(path=path, num_prompts=4, output_len=9))
    assert isinstance(workload, ChatJsonlWorkload)
    requests = workload.plan_round(0)
    assert [r.index for r in requests] == [0, 1, 2, 3]
    assert [(r.bucket, len(r.images), r.output_len, r.temperature) for r in requests] == [
        ("image", 1, 4, 0.0), ("text", 0, 3, None), ("text", 0, 9, 0.7), ("image", 1, 4, 0.0)]
    body = chat_body(requests[1], "served")
    assert body["model"] == "served" and body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert body["max_completion_tokens"] == 3 and "temperature" not in body  # absent stays absent
    assert "ignore_eos" not in body and "min_tokens" not in body  # real requests end at EOS ...
    exact = build_workload("jsonl", WorkloadOptions(path=path, num_prompts=1, exact_output=True)).plan_round(0)[0]
    assert chat_body(exact, "m").items() >= {"min_tokens": 4, "ignore_eos": True}.items()  # ... unless asked
    assert repeated_images([requests]) == 1
    image_message = grpc_messages(requests[0])[0]
    assert image_message.content[0].image == (IMAGES / "rocket_640x427.jpg").read_bytes()
    assert image_message.content[1].text == "What is this?"
    assert [m.role for m in grpc_messages(requests[1])] == ["system", "user"]


@pytest.mark.parametrize(("line", "error"), [
    ("{not json", "line 2: not valid JSON"),
    ('["a list"]', "line 2: must be a JSON object"),
    ('{"messages": [], "max_tokens": 3}', "line 2: messages must be a non-empty list"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', r"line 2: messages\[0\] must be an object with role"),
    ('{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}',
     r"line 2: messages\[0\].content\[0\] must be a text part"),
    ('{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', "line 2: max_tokens"),
    ('{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', "line 2: temperature"),
    ('{"messages": [{"role": "user", "content": "x"}], "tools": []}', "line 2: field.s. tools not supported"),
])
def test_a_bad_jsonl_line_is_refused_with_its_number(tmp_path: Path, line: str, error: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "fine"}]}\n' + line + "\n")
    with pytest.raises(ValueError, match=error):
        build_workload("jsonl", WorkloadOptions(path=path))


def test_random_mm_still_sends_exactly_output_len() -> None:
    request = Workload(bucket="448", num_prompts=1, output_len=5).plan_round(0)[0]
    body = chat_body(request, "m")
    assert body["max_completion_tokens"] == body["min_tokens"] == 5 and body["ignore_eos"] is True
    assert body["temperature"] == 0.0 and body["messages"][0]["content"][-1]["type"] == "text"
    with pytest.raises(ValueError, match="only data: URLs"):
        grpc_messages(PlannedRequest(0, "image", "x", ("http://example.com/a.jpg",), 1))
