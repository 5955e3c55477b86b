"""`dvd generate` end to end as a user runs it: answers, JSON output, and clear errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dvd.cli import main
from dvd.pipeline.local import LocalPipeline
from dvd.sampling import greedy
from tests.conftest import encode, photo_like


def _dvd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvd", *args], capture_output=True, text=True, timeout=300)


def test_generate_json_matches_the_pipeline(tmp_path: Path, tiny_hf: Path) -> None:
    image = tmp_path / "photo.jpg"
    image.write_bytes(encode(photo_like(640, 480, 7), "JPEG"))
    run = _dvd("generate", "--model", str(tiny_hf), "--image", str(image), "--prompt", "Describe the image.",
               "--max-new-tokens", "6", "--min-new-tokens", "6", "--json")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    pipe = LocalPipeline(tiny_hf)
    sampling = greedy(max_new_tokens=6, min_new_tokens=6, stop_token_ids=pipe.chat.stop_token_ids)
    expected = pipe.generate([{"role": "user", "content": "Describe the image."}], [image.read_bytes()], sampling)
    assert out["token_ids"] == expected.token_ids
    assert out["text"] == expected.text
    assert out["tokens_per_tile"] == [256] and out["num_tiles"] == expected.num_tiles
    assert {"encode_ms", "transfer_ms", "prefill_ms", "decode_ms"} <= out["timings_ms"].keys()


def test_generate_text_mode_prints_answer_and_timings(tiny_github: Path) -> None:
    run = _dvd("generate", "--model", str(tiny_github), "--prompt", "Hello", "--max-new-tokens", "3")
    assert run.returncode == 0, run.stderr
    assert "prefill" in run.stderr and "decode" in run.stderr


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda d, m: ["--image", str(d / "missing.png")], "No such file"),
        (lambda d, m: ["--image", str(d / "garbage.png")], "not recognised"),
        (lambda d, m: ["--image", str(d / "truncated.jpg")], "Truncated"),
        (lambda d, m: ["--image", str(d / "ok.png"), "--prompt", "<image><image>"], "2 image placeholders"),
        (lambda d, m: ["--temperature", "-1"], "temperature"),
        (lambda d, m: ["--max-num", "0", "--image", str(d / "ok.png")], "max_num"),
        (lambda d, m: ["--device", "cuda:99"], "device 'cuda:99': this "),  # no such GPU, or a CPU-only torch
        (lambda d, m: ["--device", "gpu0"], "device 'gpu0' is not a torch device name"),
    ],
)
def test_generate_bad_input_is_a_clear_error(
    tmp_path: Path, tiny_hf: Path, make_args, message: str, capsys: pytest.CaptureFixture
) -> None:
    """In-process (`dvd.cli.main`) to keep it fast; the subprocess tests cover the real command."""
    (tmp_path / "garbage.png").write_bytes(b"this is not an image at all")
    (tmp_path / "truncated.jpg").write_bytes(encode(photo_like(300, 200), "JPEG")[:600])
    (tmp_path / "ok.png").write_bytes(encode(photo_like(64, 64)))
    args = make_args(tmp_path, tiny_hf)
    if "--prompt" not in args:
        args += ["--prompt", "Describe."]
    assert main(["generate", "--model", str(tiny_hf), "--max-new-tokens", "2", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err


def test_unsupported_model_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    run = _dvd("generate", "--model", str(tmp_path), "--prompt", "hi")
    assert run.returncode == 2 and "BertModel" in run.stderr and "Traceback" not in run.stderr


def test_help_lists_commands() -> None:
    run = _dvd("--help")
    assert run.returncode == 0 and "generate" in run.stdout and "make-checkpoint" in run.stdout
    run = _dvd("generate", "--help")
    assert run.returncode == 0 and "--max-new-tokens" in run.stdout
