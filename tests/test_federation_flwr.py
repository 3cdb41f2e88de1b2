"""`flwr run .` end to end: Flower's Ray simulation engine, offline, cleaned up by PID."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from federation.flwr_local import LocalSimulation
from safelm import rundir
from safelm.api import load_run

ROOT = Path(__file__).resolve().parents[1]


def test_staged_app_builds_the_same_fab(tmp_path):
    """LocalSimulation hands `flwr run` a staged copy of the app; Flower builds the very same
    FAB from it as from the repository, without listing the venv's files. A control: a
    planted app file is in both, and a change to it changes the FAB."""
    import shutil

    from flwr.cli.build import build_fab_from_disk

    from federation.flwr_local import stage_app

    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__"))
    (repo / ".venv" / "lib").mkdir(parents=True)
    (repo / ".venv" / "lib" / "site.py").write_text("x = 1\n")  # gitignored: in neither
    (repo / "federation" / "planted.py").write_text("PLANTED = 1\n")
    staged = stage_app(repo, tmp_path / "staged")
    fab = build_fab_from_disk(staged)
    assert fab == build_fab_from_disk(repo)
    assert (staged / "federation" / "planted.py").is_file()
    assert not (staged / ".venv").exists()
    (repo / "federation" / "planted.py").write_text("PLANTED = 2\n")
    assert build_fab_from_disk(stage_app(repo, tmp_path / "staged")) != fab
    # a negation can re-include a file below an ignored directory: nothing is pruned then
    (repo / "federation" / "gen").mkdir()
    (repo / "federation" / "gen" / "keep.py").write_text("KEEP = 1\n")
    (repo / ".gitignore").write_text((repo / ".gitignore").read_text()
                                     + "federation/gen/*\n!federation/gen/keep.py\n")
    staged = stage_app(repo, tmp_path / "staged")
    assert build_fab_from_disk(staged) == build_fab_from_disk(repo)
    assert (staged / "federation" / "gen" / "keep.py").is_file()


def test_the_fab_ships_only_what_nodes_run(tmp_path):
    """Flower's own FAB build of the repository: the app's modules and safelm are in it; the
    deployment and local-run helpers and the fault-injection harness are not. The staged test
    harness (control) does carry the harness and points the ClientApp at it."""
    import io
    import shutil
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    from federation.flwr_local import HARNESS_APP, stage_app, stage_harness

    def names(fab: bytes) -> set[str]:
        return set(zipfile.ZipFile(io.BytesIO(fab)).namelist())

    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__"))
    shipped = names(build_fab_from_disk(repo))
    for needed in ("federation/client_app.py", "federation/server_app.py", "federation/task.py",
                   "federation/settings.py", "safelm/trainer.py", "pyproject.toml"):
        assert needed in shipped, needed
    for kept_out in ("federation/deploy.py", "federation/flwr_local.py", "federation/local.py",
                     "federation/testing/faults.py", "federation/testing/client_app.py"):
        assert kept_out not in shipped, kept_out
    assert not [n for n in shipped if n.startswith(("tests/", "benchmarks/", "audits/"))]
    staged = stage_app(repo, tmp_path / "staged")
    stage_harness(repo, staged)
    harness = names(build_fab_from_disk(staged))
    assert "federation/testing/faults.py" in harness
    assert HARNESS_APP in (staged / "pyproject.toml").read_text()


def test_no_call_home_defaults_yield_to_the_user(tmp_path, monkeypatch):
    """Flower's update check and telemetry and Ray's usage stats are off unless the user set
    them; the user's own value wins."""
    from federation.flwr_local import NO_CALL_HOME, no_call_home

    assert no_call_home({"FLWR_TELEMETRY_ENABLED": "1", "X": "y"}) == {
        "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "1",
        "RAY_USAGE_STATS_ENABLED": "0", "X": "y"}
    for var in NO_CALL_HOME:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "1")
    sim = LocalSimulation(ROOT, tmp_path)
    try:
        env = sim.env()
        assert (env["FLWR_DISABLE_UPDATE_CHECK"], env["FLWR_TELEMETRY_ENABLED"],
                env["RAY_USAGE_STATS_ENABLED"]) == ("1", "0", "1")
    finally:
        sim.__exit__(None, None, None)


@pytest.mark.slow
def test_flwr_run_simulation_with_a_failing_and_a_hostile_client(tmp_path, monkeypatch):
    # without conftest's OMP_NUM_THREADS=1, so that the clients' one thread below can only
    # come from their CPU allotment (federation.task.configure_threads falls back to it)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    out = tmp_path / "global"
    cfg = (f'out-dir="{out}" model.n_layer=1 model.d_model=32 model.n_head=4 '
           'corpus-size=800 num-server-rounds=2 strategy="median" attack="signflip" '
           'attack-clients="0" fail-clients="1" fail-rounds="1"')
    with LocalSimulation(ROOT, tmp_path / "flwr") as sim:
        try:
            res = sim.run(cfg, num_supernodes=4, cpus_per_client=1, timeout=240,
                          harness=True)
            log = res.stdout + res.stderr
            (tmp_path / "log.txt").write_text(log)
            assert not sim.crashed(res), log[-3000:]
            assert sim.leftover_pids(), "the background SuperLink should still be running"
        finally:
            stopped = sim.stop()
        assert stopped and not sim.leftover_pids()
    assert "round 2/2" in log
    recs = [r for r in rundir.read_metrics(out) if r["kind"] == "round"]
    assert [r["round"] for r in recs] == [1, 2]
    r1, r2 = recs
    assert (r1["failures"], r1["replies"], r1["aggregated"]) == (1, 3, True), json.dumps(r1)
    assert "injected failure" in r1["failed"][0]["reason"]
    assert (r2["failures"], r2["replies"]) == (0, 4)
    # each simulated client set torch's threads to its CPU allotment (1)
    assert {c["threads"] for c in r2["clients"]} == {1}
    assert sorted(c["partition-id"] for c in r2["clients"]) == [0, 1, 2, 3]
    assert (out / "partitions.png").is_file()
    assert load_run(out).cfg.train.task == "classify"
