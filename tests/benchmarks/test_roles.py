"""`dvd bench compare`'s limits: a deployment's processes by role (dvd serve's children by their command), the
CPU each role spent over a run, read from /proc, and the ideals those costs allow."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from dvd.benchmarks.roles import RoleMeter, engine_seconds, limits, processes, role_of

# A stand-in for `dvd serve`: two children named like its servers, each spending `seconds` of CPU once told to go.
ROOT = textwrap.dedent("""
    import subprocess, sys
    burn = ("import sys, time\\nsys.stdin.readline()\\nend = time.process_time() + float(sys.argv[2])\\n"
            "while time.process_time() < end:\\n    pass\\nprint('done', flush=True)")
    kids = [subprocess.Popen([sys.executable, "-c", burn, role, seconds], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
            for role, seconds in (("vision", "0.2"), ("language", "0.4"))]
    print("ready", flush=True)
    sys.stdin.readline()
    for kid in kids:
        kid.stdin.write("go\\n")
        kid.stdin.flush()
    for kid in kids:
        kid.stdout.readline()
    print("done", flush=True)
    sys.stdin.readline()  # alive until measured: a process gone takes its CPU times with it
    for kid in kids:
        kid.stdin.close()
        kid.wait()
""")


def test_role_of_reads_the_servers_command() -> None:
    assert role_of([sys.executable, "-m", "dvd", "vision", "--config", "f"]) == "vision"
    assert role_of([sys.executable, "-m", "dvd", "language", "--config", "f"]) == "language"
    assert role_of([sys.executable, "-m", "dvd", "serve"]) is None


def test_each_role_is_charged_the_cpu_its_processes_spent() -> None:
    root = subprocess.Popen([sys.executable, "-c", ROOT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert root.stdout is not None and root.stdin is not None
        assert root.stdout.readline().strip() == "ready"
        roles = processes(root.pid, "gateway")
        assert sorted(roles.values()) == ["gateway", "language", "vision"]
        meter = RoleMeter(roles)
        meter.start()
        root.stdin.write("go\n")
        root.stdin.flush()
        assert root.stdout.readline().strip() == "done"
        spent = meter.stop(completed=2)
        root.stdin.write("end\n")
        root.stdin.close()
        assert root.wait(timeout=60) == 0
    finally:
        if root.poll() is None:
            root.kill()
            root.wait()
    cpu = spent["cpu_s"]
    assert cpu["vision"] == pytest.approx(0.2, abs=0.1) and cpu["language"] == pytest.approx(0.4, abs=0.1)
    assert cpu["gateway"] < 0.1 and "client" in cpu
    assert spent["cpu_s_per_request"]["language"] == pytest.approx(cpu["language"] / 2)
    assert spent["busy"]["language"] == pytest.approx(cpu["language"] / spent["wall_s"])


def test_limits_from_a_dvd_run_and_a_coupled_run() -> None:
    dvd = limits({"cpu_s_per_request": {"vision": 0.32, "language": 0.66, "gateway": 0.05}}, throughput=1.2)
    assert dvd["pipeline_ideal"] == pytest.approx(1 / 0.66) and dvd["bottleneck"] == "language"
    assert dvd["coupled_ideal"] == pytest.approx(1 / 0.98)
    assert dvd["fraction_of_ideal"] == pytest.approx(1.2 * 0.66)
    coupled = limits({"cpu_s_per_request": {"coupled": 0.5, "client": 0.1}}, throughput=1.5, num_cpus=2)
    assert coupled["ideal"] == pytest.approx(4.0) and coupled["fraction_of_ideal"] == pytest.approx(1.5 / 4)
    assert limits({"cpu_s_per_request": {}}, throughput=1.0) == {}


def test_the_language_engines_time_is_read_from_the_gateways_metrics() -> None:
    text = "\n".join([
        "# TYPE dvd_backend_language0_engine_busy_seconds gauge", "dvd_backend_language0_engine_busy_seconds 3.5",
        "dvd_backend_language1_engine_busy_seconds 1.5", "dvd_backend_language0_engine_starved_seconds 0.25",
        "dvd_backend_language0_engine_empty_seconds 2.0", "dvd_backend_vision0_num_batches 7.0",
        "dvd_backend_language_encoder_seconds 0.75"])
    assert engine_seconds(text) == {"engine_busy_seconds": 5.0, "engine_starved_seconds": 0.25,
                                    "engine_empty_seconds": 2.0, "encoder_seconds": 0.75}


def test_a_data_parallel_runs_ideal_is_the_sum_over_its_replicas() -> None:
    roles = {"cpu_s": {"replica0": 3.0, "replica1": 2.0, "client": 0.5},
             "cpu_s_per_request": {"replica0": 0.5, "replica1": 0.4, "client": 0.05}}
    dp = limits(roles, throughput=3.0)
    assert dp["replica_ideals"] == {"replica0": pytest.approx(2.0), "replica1": pytest.approx(2.5)}
    assert dp["ideal"] == pytest.approx(4.5) and dp["fraction_of_ideal"] == pytest.approx(3.0 / 4.5)
    idle = {"cpu_s": {"replica0": 3.0, "replica1": 0.1}, "cpu_s_per_request": {"replica0": 0.5}}
    assert limits(idle, throughput=2.0) == {}  # a replica that served nothing: no ideal, rather than a flattering one
