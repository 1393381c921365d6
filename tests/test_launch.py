"""The launcher and the README's main job, end to end on the host backend."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, ONESIDE_BACKEND="host", ONESIDE_TIMEOUT="20",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "oneside.launch", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_main_job_runs_every_algorithm():
    r = _run("-n", "4", "--machines", "2", "examples/attention.py", "--seq", "67", "--heads", "8", "--dim", "16",
             "--iters", "1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert "mesh 2x2" in lines[0]
    assert [l.split()[0] for l in lines[2:]] == ["ulysses", "ring", "usp", "tas", "torus"]
    assert all(l.endswith(" ok") for l in lines[2:]), r.stdout


def test_alltoall_example_runs_and_checks():
    r = _run("-n", "4", "--machines", "2", "examples/alltoall.py", "--mib", "1", "--iters", "3")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert "mesh=2x2" in lines[0]
    assert len(lines) == 6 and all(" True " in l for l in lines[2:])


def test_launcher_propagates_failure(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(
        "import sys, oneside\n"
        "rt = oneside.init()\n"
        "if rt.rank == 1:\n"
        "    raise SystemExit(3)\n"
        "try:\n"
        "    rt.barrier_all()\n"
        "except oneside.PeerDeadError as e:\n"
        "    sys.stdout.write(f'rank {rt.rank} saw: {e}\\n'); sys.stdout.flush()\n"
        "    sys.exit(4)\n")
    r = _run("-n", "3", "--grace", "15", str(script), timeout=60)
    assert r.returncode != 0
    assert "rank 1 exited with code 3" in r.stderr
    # the survivors raised (their peer died) instead of waiting for the timeout
    for survivor in (0, 2):  # (two processes share the pipe: look for each report, not for lines)
        assert f"rank {survivor} saw: rank 1 " in r.stdout, r.stdout + r.stderr


def test_launcher_rejects_bad_arguments():
    r = _run("-n", "4", "--machines", "3", "examples/alltoall.py")
    assert r.returncode == 2 and "--machines 3" in r.stderr


def test_dit_example_tiny_on_two_ranks():
    r = _run("-n", "2", "examples/dit_sp.py", "--model", "flux", "--tiny", "--steps", "2", "--peers", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rel err first step" in r.stdout and "sfattn on 2 ranks" in r.stdout and "(uneven shards)" in r.stdout


def test_launcher_gives_each_rendezvous_its_own_free_port(tmp_path):
    script = tmp_path / "ports.py"  # each rank writes its own file (two processes share stdout)
    script.write_text("import os, pathlib, sys\n"
                      "e = os.environ\n"
                      "pathlib.Path(sys.argv[1], e['RANK']).write_text(\n"
                      "    ' '.join(e[k] for k in ('MASTER_PORT', 'ONESIDE_DIST_PORT', 'ONESIDE_STORE_PORT')))\n")
    r = _run("-n", "2", str(script), str(tmp_path), timeout=60)
    assert r.returncode == 0, r.stderr
    rows = [(tmp_path / str(rank)).read_text().split() for rank in (0, 1)]
    assert rows[0] == rows[1], rows  # every rank the same ports
    assert len(set(rows[0])) == 3, rows  # three distinct ones


def test_store_endpoint_under_torchrun_the_launcher_and_by_hand():
    from oneside.backends.nvshmem import store_endpoint

    base = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    # torchrun: its agent hosts a store at MASTER_PORT; every rank is a client (no port of ours to collide)
    torchrun = dict(base, TORCHELASTIC_USE_AGENT_STORE="True", ONESIDE_STORE_PORT="4000")
    assert [store_endpoint(torchrun, r) for r in (0, 1)] == [("10.0.0.1", 29500, False)] * 2
    # oneside.launch: the free port it picked, hosted by rank 0
    ours = dict(base, ONESIDE_STORE_PORT="41234")
    assert [store_endpoint(ours, r) for r in (0, 1)] == [("10.0.0.1", 41234, True), ("10.0.0.1", 41234, False)]
    # by hand (or torchrun without an agent store): MASTER_PORT + ONESIDE_PORT_OFFSET
    assert store_endpoint(dict(base, TORCHELASTIC_USE_AGENT_STORE="False"), 0) == ("10.0.0.1", 29501, True)
    assert store_endpoint(dict(base, ONESIDE_PORT_OFFSET="5"), 1) == ("10.0.0.1", 29505, False)
