"""Run ``flwr run .`` as a local simulation, offline, and clean up what it leaves behind.

``flwr run`` against the local connection starts a detached background SuperLink (and its
SuperExec) that outlives the command; tests and benchmarks must stop it, by PID. This helper:

* builds the environment docs/platform-notes.md asks for: ``FLWR_DISABLE_RUNTIME_DEPENDENCY_
  INSTALLATION=1`` (else Flower installs the app's dependencies into a throwaway env at run
  time, a multi-GB torch download), a private ``FLWR_HOME``, ``RAY_TMPDIR`` and
  ``MPLCONFIGDIR``, and the venv's ``bin`` first on ``PATH`` (Flower spawns
  ``flower-superlink`` and ``flwr-simulation`` by name);
* shortens start-up where Flower and Ray allow it from outside: the SuperExec polls the
  SuperLink every 0.25 s instead of 1 s, and Ray does not prestart idle workers that Flower's
  actors cannot use (see :meth:`LocalSimulation.env`);
* hands ``flwr run`` a staged copy of the app's files (:func:`stage_app`): Flower lists every
  file under the app directory to build the FAB, a ``.venv`` inside it included;
* gives the local SuperLink free ports (``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT`` /
  ``FLWR_LOCAL_CONTROL_API_PORT``), so a run never lands on someone else's SuperLink;
* stops every process whose command line names this helper's private FLWR_HOME or RAY_TMPDIR
  or its port (the SuperLink, its SuperExec and app processes, Ray daemons left after a
  failure), by PID: TERM, then KILL.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from flwr.cli.utils import build_pathspec, filter_paths_for_publish, load_gitignore_patterns
from flwr.supercore.constant import APP_PUBLISH_EXCLUDE_PATTERNS


# No call home (each respected when the user set it): Flower's processes post their version and
# OS to its update-check service at start (the flwr CLI waits for that thread), Flower sends
# usage events (platform, run-id hash, number of nodes) to its telemetry service, and Ray
# reports cluster usage statistics. A platform for sensitive data keeps all three off.
NO_CALL_HOME = {"FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0",
                "RAY_USAGE_STATS_ENABLED": "0"}


def no_call_home(env: dict[str, str]) -> dict[str, str]:
    """``env`` with :data:`NO_CALL_HOME`'s settings wherever the user has not set them."""
    return {**NO_CALL_HOME, **env}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pids_mentioning(*needles: str) -> list[int]:
    """PIDs (not ours) whose command line or environment contains any of ``needles``.

    The environment catches processes whose command line names none of our paths (Ray
    workers, Flower's app processes): they inherit FLWR_HOME / RAY_TMPDIR from the run.
    """
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            text = b" ".join([(d / "cmdline").read_bytes(), (d / "environ").read_bytes()])
        except OSError:
            continue
        if any(n.encode() in text for n in needles):
            out.append(int(d.name))
    return sorted(out)


def stop_pids(pids: list[int], grace: float = 10.0) -> None:
    """SIGTERM each PID, wait up to ``grace`` seconds, then SIGKILL the survivors."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if _alive(p)]
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is as good as gone


def stage_app(app_dir: str | Path, dest: str | Path) -> Path:
    """Copy the files Flower would pack into the app's FAB into ``dest`` (emptied first).

    Why: ``flwr run DIR`` builds the FAB by listing every file under DIR and filtering the
    list afterwards (flwr 1.42 ``collect_files``), a virtual environment included. With the
    README's ``.venv`` inside the repository that is ~46,000 files, about 2 s of the CLI's
    time before the run is even submitted, on the start-up's critical path. This walk skips
    the directories that ``.gitignore`` or Flower's own exclusions rule out (and ``.git``),
    then Flower's own filter picks the files, so the FAB built from ``dest`` is byte-identical
    to the one ``flwr run DIR`` builds (tests/test_federation_flwr.py checks). A
    ``.gitignore`` with negations (``!pattern``) could re-include files below an ignored
    directory, so then nothing but ``.git`` is skipped.
    """
    root, dest = Path(app_dir).resolve(), Path(dest).resolve()
    ignore = root / ".gitignore"
    patterns = load_gitignore_patterns(ignore.read_bytes() if ignore.is_file() else b"")
    prune = None if any(p.startswith("!") for p in patterns) else build_pathspec(
        [*patterns, *APP_PUBLISH_EXCLUDE_PATTERNS])
    files: dict[str, Path | bytes] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = Path(dirpath).relative_to(root)
        keep = []
        for name in dirnames:
            rel = (rel_dir / name).as_posix()
            if name == ".git" or (prune is not None and prune.match_file(f"{rel}/x")):
                continue
            keep.append(name)
        dirnames[:] = keep
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():  # Flower skips symlinks too
                files[(rel_dir / name).as_posix()] = path
    chosen = filter_paths_for_publish(files)
    if dest.exists():
        shutil.rmtree(dest)
    for rel in chosen:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target)
    return dest


HARNESS_APP = "federation.testing.client_app:app"


def stage_harness(app_dir: str | Path, staged: str | Path) -> None:
    """Turn a staged app into the test harness: add ``federation/testing`` (which the FAB of
    the real app excludes) and point the app's ClientApp at :data:`HARNESS_APP`."""
    src, staged = Path(app_dir).resolve(), Path(staged)
    shutil.copytree(src / "federation" / "testing", staged / "federation" / "testing",
                    ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    toml = staged / "pyproject.toml"
    text = toml.read_text(encoding="utf-8")
    for old, new in (('clientapp = "federation.client_app:app"', f'clientapp = "{HARNESS_APP}"'),
                     ('"federation/testing/**", ', ""), (', "federation/testing/**"', "")):
        text = text.replace(old, new)
    if HARNESS_APP not in text or "federation/testing/**" in text:
        raise RuntimeError(f"{toml}: could not switch the staged app to {HARNESS_APP}")
    toml.write_text(text, encoding="utf-8")


class LocalSimulation:
    """Context manager around ``flwr run <app> --stream`` with a private Flower home."""

    def __init__(self, app_dir: str | Path, workdir: str | Path | None = None) -> None:
        self.app_dir = Path(app_dir).resolve()
        self._tmp = None if workdir else tempfile.mkdtemp(prefix="safelm-flwr-")
        self.root = Path(workdir or self._tmp).resolve()
        self.home = self.root / "flwr-home"
        # Ray puts AF_UNIX sockets under RAY_TMPDIR, and those paths must stay < 108 bytes.
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        for d in (self.home, self.root / "mpl"):
            d.mkdir(parents=True, exist_ok=True)
        # Flower's default local connection, but with the SuperLink's state in memory rather
        # than in SQLite under FLWR_HOME: this private home is thrown away anyway, and the
        # SuperLink answers its health check ~0.35 s sooner (1.0 s against 1.37 s here).
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local-in-memory:"\n')
        self.ports = (free_port(), free_port())

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_HOME": str(self.home), "RAY_TMPDIR": str(self.ray_tmp),
            "MPLCONFIGDIR": str(self.root / "mpl"), "MPLBACKEND": "Agg",
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(self.ports[0]),
            "FLWR_LOCAL_CONTROL_API_PORT": str(self.ports[1]),
            "RAY_DEDUP_LOGS": "0", "PYTHONUNBUFFERED": "1",
            # The SuperExec asks the SuperLink for new work every second by default, and the
            # run's simulation process waits for that poll. Every 0.25 s started runs ~2 s
            # sooner here; faster polling (0.1 s) kept the SuperLink busy enough (7% of a
            # core) to slow the clients it shares the CPUs with.
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": env.get("FLWR_SUPEREXEC_TASK_POLL_INTERVAL",
                                                         "0.25"),
            # Ray starts one idle worker per CPU as soon as a driver connects, but Flower's
            # actors carry a runtime env (PYTHONPATH) and so need workers of their own: the
            # idle ones only take CPU from them while they start (~0.6 s of start-up here).
            "RAY_prestart_worker_first_driver": env.get("RAY_prestart_worker_first_driver",
                                                        "0")})
        return no_call_home(env)

    def run(self, run_config: str = "", *, num_supernodes: int = 4, cpus_per_client: int = 1,
            timeout: float = 300.0, harness: bool = False) -> subprocess.CompletedProcess[str]:
        """``flwr run <app> --stream`` (the app staged by :func:`stage_app`); output captured;
        raises TimeoutExpired after ``timeout``. ``harness``: run the test ClientApp
        (fault injection, hostile clients: :func:`stage_harness`) instead of the production one."""
        app = stage_app(self.app_dir, self.root / "app")
        if harness:
            stage_harness(self.app_dir, app)
        cmd = [str(Path(sys.executable).parent / "flwr"), "run", str(app), "--stream",
               "--federation-config",
               f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client}"]
        if run_config:
            cmd += ["--run-config", run_config]
        return subprocess.run(cmd, cwd=self.app_dir, env=self.env(), text=True,
                              capture_output=True, timeout=timeout)

    @staticmethod
    def crashed(res: subprocess.CompletedProcess[str]) -> bool:
        """``flwr run --stream`` exits 0 even when the ServerApp or simulation failed; the
        streamed log says so with an exit code line."""
        log = res.stdout + res.stderr
        return res.returncode != 0 or "Exit Code:" in log or "unhandled exception" in log

    def leftover_pids(self) -> list[int]:
        """SuperLink (names FLWR_HOME), SuperExec and app processes (name our port), Ray."""
        return pids_mentioning(str(self.home), str(self.ray_tmp), f"127.0.0.1:{self.ports[0]}")

    def stop(self) -> list[int]:
        """Stop the background SuperLink and anything else started under our paths."""
        pids = self.leftover_pids()
        stop_pids(pids)
        again = self.leftover_pids()  # children that appeared while the parent was stopping
        stop_pids(again, grace=3.0)
        return pids + again

    def __enter__(self) -> LocalSimulation:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m federation.flwr_local stop [--flwr-home DIR]``: stop the background local
    SuperLink (and its SuperExec/app processes) that ``flwr run`` left under that Flower home."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m federation.flwr_local",
                                 description=main.__doc__)
    ap.add_argument("command", choices=["stop"])
    ap.add_argument("--flwr-home", default=os.environ.get("FLWR_HOME",
                                                          str(Path.home() / ".flwr")))
    args = ap.parse_args(argv)
    home = str(Path(args.flwr_home).expanduser().resolve())
    pids = [p for p in pids_mentioning(home + "/local-superlink", f"FLWR_HOME={home}")]
    stop_pids(pids)
    print(f"stopped {len(pids)} process(es) of the local SuperLink under {home}: {pids}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
