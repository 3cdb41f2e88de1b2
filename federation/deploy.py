"""A real Flower deployment on one machine: TLS, SuperNode authentication, N nodes, one run.

    python -m federation.deploy --nodes 2 --rounds 2 --out runs/deploy [--run-config "..."]

What it does, in order (everything lands in ``--out``):

1. ``certs/``: an openssl CA and a server certificate for 127.0.0.1 (SAN IP:127.0.0.1,
   DNS:localhost) signed by it; clients trust only that CA.
2. ``keys/``: one ECDSA P-384 key pair per SuperNode, OpenSSH format (what Flower's
   SuperNode authentication expects), made with ``cryptography`` (a Flower dependency).
3. ``flwr-home/config.toml``: a SuperLink connection ``deploy`` (address + CA), so ``flwr``
   commands talk TLS to our SuperLink and nothing else.
4. ``flower-superlink`` with TLS and ``--enable-supernode-auth``; each node's public key is
   registered with ``flwr supernode register`` before the node starts. A node whose key is
   not registered is refused by the SuperLink ("No SuperNode found with the given public key").
5. N ``flower-supernode`` processes, node config ``partition-id=i num-partitions=N
   num-threads=T`` (T = cores // N), each with its own ClientAppIo port.
6. ``flwr run <app> deploy --stream`` with ``out-dir=OUT/global`` and ``min-nodes=N``: the
   same app as the simulation, unchanged (its files staged under the Flower home, so Flower
   does not list the repository's venv to package it; the package is byte-identical).
7. Every process started here -- and every descendant (SuperExec, ServerApp/ClientApp
   processes) -- is stopped by PID (TERM, then KILL) in a ``finally``, so also on failure,
   Ctrl-C (SIGINT) or SIGTERM. Logs stay in ``logs/``.

Exit status: 0 when the run finished all rounds, 1 when it did not (the log tail is printed),
2 with one ``error:`` line for bad options.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from safelm.errors import UserError

from .flwr_local import free_port, no_call_home, pids_mentioning, stage_app, stop_pids

ROOT = Path(__file__).resolve().parents[1]


# ---- certificates and keys ----------------------------------------------------------------
def make_certs(d: Path) -> dict[str, Path]:
    """CA + server certificate for 127.0.0.1 with openssl (never reused across runs)."""
    d.mkdir(parents=True, exist_ok=True)
    p = {k: d / f"{k}" for k in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt")}
    ext = d / "server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
                   "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    steps = [
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "7", "-subj",
         "/CN=SafeLM deploy CA", "-keyout", p["ca.key"], "-out", p["ca.crt"]],
        ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout",
         p["server.key"], "-out", p["server.csr"]],
        ["x509", "-req", "-in", p["server.csr"], "-CA", p["ca.crt"], "-CAkey", p["ca.key"],
         "-CAcreateserial", "-days", "7", "-extfile", ext, "-out", p["server.crt"]],
    ]
    for args in steps:
        try:
            subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)
        except FileNotFoundError:
            raise UserError("openssl is not installed; install it (apt-get install openssl) "
                            "to create the deployment's certificates") from None
    return p


def make_node_key(d: Path, name: str) -> tuple[Path, Path]:
    """An OpenSSH ECDSA P-384 key pair ``name`` / ``name.pub`` (private key mode 0600)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    d.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    priv, pub = d / name, d / f"{name}.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    priv.chmod(0o600)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                  serialization.PublicFormat.OpenSSH) + b"\n")
    return priv, pub


# ---- processes ----------------------------------------------------------------------------
def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (from /proc), children before grandchildren."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


class Deployment:
    """SuperLink + N authenticated SuperNodes over TLS; a context manager that stops them."""

    def __init__(self, out: str | Path, nodes: int, *, threads: int = 0) -> None:
        if nodes < 1:
            raise UserError(f"--nodes {nodes} must be >= 1")
        self.out = Path(out).resolve()
        self.n = nodes
        self.threads = threads or max(1, (os.cpu_count() or 1) // nodes)
        self.port = free_port()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs = self.out / "logs"
        self.home = self.out / "flwr-home"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
                    "FLWR_HOME": str(self.home), "MPLBACKEND": "Agg",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "PYTHONUNBUFFERED": "1"})
        return no_call_home(env)

    def _bin(self, name: str) -> str:
        return str(Path(sys.executable).parent / name)

    def _start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "wb")
        p = subprocess.Popen(args, env=self.env(), cwd=ROOT, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def _flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self._bin("flwr"), *args], env=self.env(), cwd=ROOT, text=True,
                              capture_output=True, timeout=timeout)

    def start(self) -> Deployment:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.certs = make_certs(self.out / "certs")
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\n'
            f'address = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{self.certs["ca.crt"]}"\n')
        c = self.certs
        self._start("superlink", [
            self._bin("flower-superlink"), "--ssl-ca-certfile", str(c["ca.crt"]),
            "--ssl-certfile", str(c["server.crt"]), "--ssl-keyfile", str(c["server.key"]),
            "--enable-supernode-auth", "--host", "127.0.0.1", "--port", str(self.port),
            "--disable-runtime-dependency-installation"])
        self._wait_ready()
        for i in range(self.n):
            priv, pub = make_node_key(self.out / "keys", f"node-{i}")
            self.register(pub)
            self.start_node(i, priv)
        return self

    def _wait_ready(self, timeout: float = 60) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.procs[0].poll() is not None:
                raise RuntimeError("the SuperLink exited at start; see "
                                   f"{self.logs / 'superlink.log'}")
            if "Uvicorn running" in (self.logs / "superlink.log").read_text(errors="replace"):
                return
            time.sleep(0.3)
        raise RuntimeError(f"the SuperLink did not start within {timeout:.0f} s")

    def register(self, pub: Path) -> None:
        res = self._flwr("supernode", "register", str(pub), "deploy")
        if res.returncode != 0 or "registered successfully" not in res.stdout:
            raise RuntimeError(f"registering {pub.name} failed: {res.stdout}{res.stderr}")

    def start_node(self, i: int, key: Path, name: str = "") -> subprocess.Popen[bytes]:
        """A SuperNode with partition ``i``, authenticating with private key ``key``."""
        return self._start(name or f"supernode-{i}", [
            self._bin("flower-supernode"), "--root-certificates", str(self.certs["ca.crt"]),
            "--superlink", f"127.0.0.1:{self.port}", "--auth-supernode-private-key", str(key),
            "--node-config",
            f"partition-id={i} num-partitions={self.n} num-threads={self.threads}",
            "--port", str(free_port()), "--max-retries", "3"])

    def online_nodes(self) -> int:
        res = self._flwr("supernode", "list", "deploy", "--format", "json")
        try:
            nodes = json.loads(res.stdout[res.stdout.index("{"):])["nodes"]
        except (ValueError, KeyError):
            return 0
        return sum(n["status"] == "online" for n in nodes)

    def run(self, run_config: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        """``flwr run <app> deploy --stream`` with ``run_config``; the app is the repository's
        files staged under the Flower home (:func:`federation.flwr_local.stage_app`)."""
        app = stage_app(ROOT, self.home / "app")
        return self._flwr("run", str(app), "deploy", "--stream", "--run-config", run_config,
                          timeout=timeout)

    def stop(self) -> list[int]:
        """TERM then KILL every started process and its descendants, by PID."""
        pids: list[int] = []
        for p in reversed(self.procs):
            pids += descendants(p.pid) + [p.pid]
        # and any process that inherited our FLWR_HOME but was re-parented (its parent died)
        pids += [q for q in pids_mentioning(str(self.home)) if q not in pids]
        stop_pids(pids)
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        return pids

    def __enter__(self) -> Deployment:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through `finally`, which stops every process


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m federation.deploy", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, required=True, help="SuperNodes to start (>= 1)")
    ap.add_argument("--rounds", type=int, required=True, help="federated rounds (>= 1)")
    ap.add_argument("--out", required=True, help="folder for certs, keys, logs, global run")
    ap.add_argument("--run-config", default="",
                    help='more run-config, e.g. \'strategy="median" local-epochs=2\'')
    ap.add_argument("--timeout", type=float, default=900, help="seconds for the run")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    try:
        if args.rounds < 1:
            raise UserError(f"--rounds {args.rounds} must be >= 1")
        if out.exists() and any(out.iterdir()):
            raise UserError(f"--out {out} exists and is not empty; choose a new folder")
        dep = Deployment(out, args.nodes)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Ctrl-C (SIGINT) and SIGTERM stop every process, also when this was started from a
    # background job of a non-interactive shell, which leaves SIGINT ignored (Python then
    # keeps it ignored) and the children would outlive a Ctrl-C meant for them
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _sigterm)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    t0 = time.perf_counter()
    rc = (f'out-dir="{out / "global"}" num-server-rounds={args.rounds} '
          f'min-nodes={args.nodes} {args.run_config}').strip()
    try:
        with dep:
            print(f"SuperLink (TLS, node auth) on 127.0.0.1:{dep.port}; {args.nodes} "
                  f"SuperNodes registered and started; logs in {dep.logs}", flush=True)
            res = dep.run(rc, timeout=args.timeout)
            (dep.logs / "run.log").write_text(res.stdout + res.stderr)
        log = res.stdout + res.stderr
        seen: list[str] = []  # Flower streams each log line twice (two handlers)
        for line in log.splitlines():
            if f"/{args.rounds} |" in line and "round " in line:
                text = line[line.index("round "):]
                if text not in seen:
                    seen.append(text)
                    print(text)
        ok = (out / "global" / "fl_state.json").is_file() and json.loads(
            (out / "global" / "fl_state.json").read_text())["round"] == args.rounds
        if not ok:
            print("\n".join(log.splitlines()[-40:]), file=sys.stderr)
            print(f"error: the run did not finish {args.rounds} rounds; see {dep.logs}",
                  file=sys.stderr)
            return 1
        print(f"done in {time.perf_counter() - t0:.0f} s; global run dir: {out / 'global'}; "
              "all processes stopped")
        return 0
    except KeyboardInterrupt:
        print("interrupted; all processes stopped", file=sys.stderr)
        return 130
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"error: {e}; all processes stopped; logs in {dep.logs}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
