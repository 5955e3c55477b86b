"""`dvd bench serve`'s folder and jsonl workloads end to end against `dvd serve` on the tiny model: each
writes a complete JSON result that says which workload ran. Small counts, no plots (the random-mm test
in test_bench_serve.py draws those)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from dvd.benchmarks import serve
from tests.serve_process import ServeProcess

IMAGES = Path(__file__).parents[1] / "fixtures" / "images"


def _complete(run: dict, count: int) -> None:
    assert run["completed"] == count and run["failed"] == 0, run["errors"]
    for key in ("request_throughput", "output_throughput", "total_token_throughput", "mean_ttft_ms",
                "median_tpot_ms", "p90_itl_ms", "p99_e2el_ms"):
        assert isinstance(run[key], float) and run[key] == run[key], key  # present, not NaN
    assert {"encode", "transfer", "queue", "prefill", "decode"} <= run["stages_ms"].keys()
    assert len(run["requests"]) == count


def test_folder_and_jsonl_workloads_against_dvd_serve(tiny_hf: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("rocket_640x427.jpg", "chelsea_cat_451x300.jpg"):
        (folder / name).write_bytes((IMAGES / name).read_bytes())
    (folder / "notes.txt").write_text("not a picture")
    picture = "data:image/jpeg;base64," + base64.b64encode((IMAGES / "coffee_600x400.jpg").read_bytes()).decode()
    jsonl = tmp_path / "requests.jsonl"
    jsonl.write_text("\n".join(json.dumps(line) for line in [
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": picture}},
                                                   {"type": "text", "text": "What is this?"}]}],
         "max_completion_tokens": 3, "temperature": 0},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
         "max_tokens": 2, "temperature": 0.5},
    ]) + "\n")
    with ServeProcess("--model", str(tiny_hf)) as served:
        folder_file = tmp_path / "folder.json"
        code = serve.main(["--base-url", served.http_url, "--dataset", "folder", "--dataset-path", str(folder),
                           "--num-prompts", "3", "--output-len", "2", "--num-warmups", "1", "--no-plots",
                           "--result-file", str(folder_file), "--quiet"])
        assert code == 0
        jsonl_file = tmp_path / "jsonl.json"
        code = serve.main(["--base-url", served.http_url, "--dataset", "jsonl", "--dataset-path", str(jsonl),
                           "--num-prompts", "3", "--jsonl-exact-output", "--num-warmups", "0", "--no-plots",
                           "--result-file", str(jsonl_file), "--quiet"])
        assert code == 0
        grpc_file = tmp_path / "jsonl-grpc.json"
        code = serve.main(["--api", "grpc", "--grpc-address", served.grpc_address, "--dataset", "jsonl",
                           "--dataset-path", str(jsonl), "--num-prompts", "2", "--jsonl-exact-output",
                           "--num-warmups", "0", "--no-plots", "--result-file", str(grpc_file), "--quiet"])
        assert code == 0
    assert served.leftover_children == []
    out = capsys.readouterr()
    assert f"Workload: folder {folder}: 2 image(s), 1 file(s) skipped" in out.out
    assert f"Workload: jsonl {jsonl}: 2 request(s) (1 with images)" in out.out
    assert "skipped notes.txt: not an image file" in out.err
    assert "encoder cache may hit" in out.err  # 3 requests over 2 pictures

    result = json.loads(folder_file.read_text())
    assert result["workload"]["dataset"] == "folder" and result["encoder_cache_may_hit"] is True
    assert result["workload"]["skipped"][0]["file"] == "notes.txt"
    run = result["runs"][0]
    _complete(run, 3)
    assert run["total_output_tokens"] == 3 * 2  # exactly --output-len
    assert all(r["num_images"] == 1 and r["timings"]["visual_tokens"] > 0 for r in run["requests"])
    assert run["requests"][0]["timings"]["encode_ms"] > 0  # the first picture was encoded, not a cache hit

    for path, count, tokens in ((jsonl_file, 3, 3 + 2 + 3), (grpc_file, 2, 3 + 2)):
        result = json.loads(path.read_text())
        assert result["workload"]["dataset"] == "jsonl"
        run = result["runs"][0]
        _complete(run, count)
        assert run["total_output_tokens"] == tokens  # each line's own max tokens, exactly
        assert set(run["per_bucket"]) == {"image", "text"}
