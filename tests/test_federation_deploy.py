"""`python -m federation.deploy`: TLS + SuperNode auth on loopback, and a clean stop."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from federation.deploy import Deployment, descendants, main, make_node_key
from federation.flwr_local import free_port, pids_mentioning, stop_pids
from safelm import rundir

ROOT = Path(__file__).resolve().parents[1]
TINY = "model.n_layer=1 model.d_model=32 model.n_head=4 corpus-size=800"


@pytest.mark.slow
def test_two_nodes_two_rounds_over_tls(tmp_path, capsys):
    out = tmp_path / "dep"
    assert main(["--nodes", "2", "--rounds", "2", "--out", str(out), "--run-config",
                 TINY]) == 0
    printed = capsys.readouterr().out
    assert "round 2/2" in printed and "all processes stopped" in printed
    recs = [r for r in rundir.read_metrics(out / "global") if r["kind"] == "round"]
    assert [(r["round"], r["replies"], r["failures"]) for r in recs] == [(1, 2, 0), (2, 2, 0)]
    assert sorted(c["partition-id"] for c in recs[-1]["clients"]) == [0, 1]
    log = (out / "logs" / "superlink.log").read_text()
    assert "https://127.0.0.1" in log  # the Fleet/Control API served TLS
    assert not pids_mentioning(str(out))  # nothing left running


@pytest.mark.slow
def test_unregistered_node_is_refused_and_ctrl_c_stops_everything(tmp_path):
    out = tmp_path / "dep"
    proc = subprocess.Popen([sys.executable, "-m", "federation.deploy", "--nodes", "1",
                             "--rounds", "50", "--out", str(out), "--run-config", TINY],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    rogue = None
    try:
        line = proc.stdout.readline()  # printed once the registered node is started
        assert "SuperNodes registered and started" in line, line
        port = int(line.split("127.0.0.1:")[1].split(";")[0])
        dep = Deployment(out, 1)  # for its env/paths only: no new processes
        dep.port, dep.certs = port, {"ca.crt": out / "certs" / "ca.crt"}
        # the rogue lives under its own paths, so the final check sees deploy's processes only
        rogue_dir = tmp_path / "rogue"
        key, _ = make_node_key(rogue_dir, "rogue")  # never registered
        ca = rogue_dir / "ca.crt"
        ca.write_bytes((out / "certs" / "ca.crt").read_bytes())
        rogue_log = rogue_dir / "rogue.log"
        with open(rogue_log, "wb") as f:  # a file, not a pipe: its SuperExec child keeps
            rogue = subprocess.Popen(      # pipes open after the node itself gives up
                [str(Path(sys.executable).parent / "flower-supernode"), "--root-certificates",
                 str(ca), "--superlink", f"127.0.0.1:{port}",
                 "--auth-supernode-private-key", str(key), "--node-config",
                 "partition-id=0 num-partitions=1", "--port", str(free_port()),
                 "--max-retries", "1"], env={**dep.env(), "FLWR_HOME": str(rogue_dir)},
                stdout=f, stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        while "Failed to activate SuperNode" not in rogue_log.read_text(errors="replace"):
            assert time.monotonic() - t0 < 60, rogue_log.read_text()
            time.sleep(0.5)
        assert "No SuperNode found with the given public key" in (
            out / "logs" / "superlink.log").read_text()
        assert dep.online_nodes() == 1  # only the registered node
        stop_pids(pids_mentioning(str(rogue_dir)))
        time.sleep(2)  # let the run get going, then Ctrl-C the deployment
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
        assert proc.returncode == 130 and "all processes stopped" in rest
        assert not pids_mentioning(str(out))
    finally:
        for p in (proc, rogue):
            if p is not None and p.poll() is None:
                stop_pids(descendants(p.pid) + [p.pid])
        stop_pids(pids_mentioning(str(out)) + pids_mentioning(str(tmp_path / "rogue")))
