"""`dvd serve`'s placement flags pin every role where asked (read back from each process), and `dvd bench
serve` / `dvd bench compare` run end to end on the tiny model: a complete JSON result, every plot, the
table. Small counts: these keep the benchmarks from rotting; the figures themselves are in
benchmarks/RESULTS.md."""

from __future__ import annotations

import json
import os
from pathlib import Path

import psutil
import pytest

from dvd.benchmarks import compare, serve
from dvd.tools.make_checkpoint import make_checkpoint
from tests.serve_process import ServeProcess

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 or not {0, 1} <= os.sched_getaffinity(0),
                                reason="placement needs CPUs 0 and 1")


def _role(proc: psutil.Process) -> str:
    line = " ".join(proc.cmdline())
    return "vision" if " vision " in f"{line} " else "language" if " language " in f"{line} " else "?"


def test_placement_pins_each_role_and_bench_serve_writes_everything(tiny_hf: Path, tmp_path: Path) -> None:
    with ServeProcess("--model", str(tiny_hf), "--vision-cpus", "1", "--language-cpus", "0",
                      "--gateway-cpus", "1") as served:
        affinity = {_role(p): p.cpu_affinity() for p in served.children()}
        assert affinity == {"vision": [1], "language": [0]}
        gateway = psutil.Process(served.proc.pid)
        assert {tuple(gateway.cpu_affinity())} == {(1,)}
        # every thread, not only the main one (Linux pins per thread)
        for thread in gateway.threads():
            assert os.sched_getaffinity(thread.id) == {1}
        assert "vision server pinned to CPU(s) 1, 1 torch thread(s)" in served.output
        assert "language server pinned to CPU(s) 0, 1 torch thread(s)" in served.output

        result_file = tmp_path / "run.json"
        code = serve.main(["--base-url", served.http_url, "--bucket", "mixed", "--text-fraction", "0.25",
                           "--num-prompts", "4", "--output-len", "3", "--request-rate", "50,inf",
                           "--goodput", "ttft:60000", "--num-warmups", "1", "--result-file", str(result_file),
                           "--quiet"])
    assert code == 0
    result = json.loads(result_file.read_text())
    assert [run["request_rate"] for run in result["runs"]] == [50.0, float("inf")]
    for run in result["runs"]:
        assert run["completed"] == 4 and run["failed"] == 0
        for key in ("request_throughput", "output_throughput", "total_token_throughput", "request_goodput",
                    "mean_ttft_ms", "median_tpot_ms", "p90_itl_ms", "p99_e2el_ms",
                    "mean_visual_tokens_per_request"):
            assert isinstance(run[key], float) and run[key] == run[key], key  # present, not NaN
        assert run["total_output_tokens"] == 4 * 3  # min_tokens = max_completion_tokens, ignore_eos
        image_runs = [r for r in run["requests"] if r["num_images"]]
        assert image_runs and all(r["timings"]["visual_tokens"] > 0 for r in image_runs)
        # stages measured on the servers: the encode and the transport's write of every image request
        assert {"encode", "transfer", "queue", "prefill", "decode"} <= run["stages_ms"].keys()
        assert all(r["timings"]["transfer_ms"] > 0 and r["timings"]["encode_ms"] > 0 for r in image_runs)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"run-throughput.png", "run-cdf-rate50.png", "run-timeline-rate50.png", "run-cdf-rateinf.png",
            "run-timeline-rateinf.png"} <= names
    assert all((tmp_path / n).stat().st_size > 1000 for n in names if n.endswith(".png"))
    assert served.leftover_children == []


def test_coupled_pinned_and_the_grpc_api(tiny_hf: Path, tmp_path: Path) -> None:
    with ServeProcess("--model", str(tiny_hf), "--coupled", "--cpus", "0") as served:
        process = psutil.Process(served.proc.pid)
        assert process.cpu_affinity() == [0]
        assert all(os.sched_getaffinity(t.id) == {0} for t in process.threads())
        assert "coupled server pinned to CPU(s) 0, 1 torch thread(s)" in served.output
        result_file = tmp_path / "grpc.json"
        code = serve.main(["--api", "grpc", "--grpc-address", served.grpc_address, "--bucket", "448",
                           "--num-prompts", "2", "--output-len", "2", "--num-warmups", "0", "--no-plots",
                           "--result-file", str(result_file), "--quiet"])
    assert code == 0
    run = json.loads(result_file.read_text())["runs"][0]
    assert run["completed"] == 2 and run["total_output_tokens"] == 4


@pytest.mark.slow  # three deployments started one after another: about 2 min here under load
def test_bench_compare_runs_each_mode_and_writes_the_table(tiny_hf: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    flash = make_checkpoint(tmp_path / "tiny-flash", preset="tiny", flash=True)
    table = tmp_path / "table.json"
    code = compare.main(["--model", str(tiny_hf), "--vir-model", str(flash), "--modes", "coupled,dvd,dvd+vir",
                         "--buckets", "448", "--num-prompts", "2", "--interference-prompts", "2",
                         "--output-len", "2", "--num-warmups", "0", "--json", str(table), "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert "setting paper" in out and "448 px" in out and "(1.00x)" in out
    result = json.loads(table.read_text())
    row = result["buckets"]["448"]
    assert row["coupled"] > 0 and row["ratio_dvd"] > 0 and row["ratio_dvd_vir"] > 0
    assert set(result["interference"]) <= {"coupled", "dvd", "dvd+vir"}
    limits = result["limits"]["448"]  # each run's roles, read from /proc, and the ideals they allow
    assert limits["dvd"]["pipeline_ideal"] > 0 and limits["dvd"]["coupled_ideal"] < limits["dvd"]["pipeline_ideal"]
    assert {"vision", "language", "gateway", "client"} <= limits["dvd"]["roles"]["cpu_s"].keys()
    assert limits["coupled"]["ideal"] > 0 and "coupled" in limits["coupled"]["roles"]["cpu_s_per_request"]
    assert "pipeline's ideal 1 / max" in out and "448 px limits" in out
    assert psutil.Process().children(recursive=True) == []  # every deployment it started is gone


@pytest.mark.slow  # two replicas started together: about 2 min here under load
def test_bench_compare_coupled_dp_runs_a_pinned_replica_per_cpu(tiny_hf: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    table = tmp_path / "table.json"
    code = compare.main(["--model", str(tiny_hf), "--modes", "coupled-dp", "--setting", "equal", "--buckets", "448",
                         "--num-prompts", "4", "--max-concurrency", "4", "--interference-prompts", "0",
                         "--output-len", "2", "--num-warmups", "1", "--json", str(table), "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert "coupled-dp: dvd serve --coupled --cpus 0 and dvd serve --coupled --cpus 1" in out
    result = json.loads(table.read_text())
    # two deployments, each pinned to its own CPU (read from the process while it served)
    assert [d["cpu_affinity"] for d in result["deployments"]["coupled-dp"]] == [[0], [1]]
    run = result["runs"]["coupled-dp"]["448"]
    assert run["completed"] == 4 and run["failed"] == 0
    endpoints = [d["http"] for d in result["deployments"]["coupled-dp"]]
    # four at once, each to the replica with fewest outstanding: two each
    assert [(e["endpoint"], e["completed"]) for e in run["endpoints"]] == [(endpoints[0], 2), (endpoints[1], 2)]
    limit = result["limits"]["448"]["coupled-dp"]
    assert limit["replica_ideals"].keys() == {"replica0", "replica1"} and limit["ideal"] > 0
    assert limit["roles"]["completed_by_role"] == {"replica0": 2, "replica1": 2}
    assert "ideal = sum over replicas of 1 / cost" in out
    assert psutil.Process().children(recursive=True) == []  # both replicas (and anything under them) are gone


@pytest.mark.slow  # one P/D deployment (vision, prefill and decode servers): about a minute here under load
def test_bench_compare_runs_the_pd_mode_with_its_interference_run(tiny_hf: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    table = tmp_path / "table.json"
    code = compare.main(["--model", str(tiny_hf), "--modes", "dvd-pd", "--buckets", "448", "--num-prompts", "2",
                         "--interference-prompts", "2", "--output-len", "2", "--num-warmups", "0", "--json",
                         str(table), "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert "--prefill-replicas 1 --decode-replicas 1" in out and "dvd-pd req/s" in out
    result = json.loads(table.read_text())
    assert result["buckets"]["448"]["dvd-pd"] > 0 and set(result["interference"]) <= {"dvd-pd"}
    # the text requests' TPOT with no image traffic, what the interference target is measured against
    assert set(result["interference_alone"]) == {"dvd-pd"} and result["interference_alone"]["dvd-pd"] >= 0
    assert "the same text requests with no image traffic: dvd-pd" in out
    assert psutil.Process().children(recursive=True) == []
