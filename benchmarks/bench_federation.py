"""Flower's simulation engine against the same federated training in plain Python.

(a) ``flwr run .`` with K clients x R rounds (Ray, 1 CPU and 1 torch thread per client) against
    the same K x R local trainings done by a plain ``multiprocessing`` pool with as many
    workers as Ray has CPUs (1 thread each), with the same partitions, seeds, epochs, FedAvg
    and central evaluation: the work per round is identical, only the owner of the loop
    differs. The load is sized so that training dominates (a minute or more). Reported: the
    ratio of the round time (the first client's start in round 1 to the last round's end;
    target <= 1.1), and Flower's fixed start-up (``flwr run`` launch to the first client's
    start: Flower's CLI, SuperLink, SuperExec, the simulation process, the ServerApp's own
    set-up, Ray and its actors) and teardown (last round end to the background SuperLink
    stopped) separately (target <= 10 s each). The start-up is also split at the moment the
    ServerApp sends round 1 (``serverapp_ready_s``; the rest, ``actor_wait_s``, is Ray's
    actors still starting).
(b) 100 simulated clients, 10 sampled per round: completes, and the peak resident memory of
    every process of the run (SuperLink, simulation, Ray daemons and workers), summed over
    processes and sampled every 0.25 s.

Both sides of (a) report the final test loss: the server aggregates replies in partition
order, so the two do the same arithmetic and should agree to float precision (a check that
the comparison is like for like). The machine's load average is printed and reported: on a
shared machine, start-up in particular stretches with it.

Usage: python benchmarks/bench_federation.py [--quick] [--skip-a] [--skip-b] [--warm]
       [--startup-runs N]
Last line: {"simulation_vs_plain": {...}, "clients_100_sample_10": {...}}
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


# ---- (a) the plain-Python side --------------------------------------------------------------
def _worker_init() -> None:
    import torch
    torch.set_num_threads(1)


def _train_client(job: tuple[dict[str, Any], int, int, int, dict[str, np.ndarray]]
                  ) -> tuple[int, int, dict[str, np.ndarray]]:
    """One client's local training for one round, exactly as the ClientApp does it."""
    import torch
    from flwr.app import ArrayRecord

    from federation import task
    from federation.settings import parse_run_config

    rc, pid, n, rnd, weights = job
    _, fed = parse_run_config({key: v for key, v in rc.items() if not key.startswith("_")})
    cfg = task.config_from_json(rc["_cfg"])
    data = task.client_data(cfg, rc["_tok"], fed, pid, n, {})
    model = task.new_model(cfg)
    task.set_weights(model, ArrayRecord(torch_state_dict={k: torch.from_numpy(v)
                                                          for k, v in weights.items()}))
    task.train_local(model, cfg, data, epochs=fed.local_epochs, server_round=rnd,
                     seed=task.client_seed(cfg.train.seed, pid, rnd))
    sd = task.get_weights(model).to_torch_state_dict()
    return pid, len(data.train_set), {k: v.numpy() for k, v in sd.items()}


def plain_rounds(rc: dict[str, Any], k: int, rounds: int, workers: int) -> dict[str, float]:
    """FedAvg over a process pool; returns the rounds' wall time and the final test loss."""
    import torch
    from flwr.app import ArrayRecord

    from federation import task
    from federation.settings import parse_run_config

    cfg, fed = parse_run_config({key: v for key, v in rc.items() if not key.startswith("_")})
    data = task.server_data(cfg, fed)
    rc = {**rc, "_cfg": data.cfg.to_json(), "_tok": task.tokenizer_to_json(data.tokenizer)}
    weights = {kk: v.numpy() for kk, v in
               task.get_weights(task.new_model(data.cfg)).to_torch_state_dict().items()}
    # The workers get what Ray gives its 1-CPU actors: OMP_NUM_THREADS=1 before torch loads
    # (torch.set_num_threads alone leaves other pools sized to the machine).
    saved = {var: os.environ.get(var) for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update({var: "1" for var in saved})
    pool_cm = mp.get_context("spawn").Pool(workers, initializer=_worker_init)
    for var, old in saved.items():
        if old is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = old
    with pool_cm as pool:
        pool.map(_warm, [rc] * workers)  # imports and data loading: start-up, not rounds
        torch.set_num_threads(max(1, int(rc.get("server-threads", 1))))  # as the ServerApp
        t0, eval_s = time.perf_counter(), 0.0
        for rnd in range(1, rounds + 1):
            out = pool.map(_train_client, [(rc, pid, k, rnd, weights) for pid in range(k)])
            t_eval = time.perf_counter()
            total = sum(n for _, n, _ in out)
            weights = {kk: sum(w[kk] * (n / total) for _, n, w in out) for kk in weights}
            model = task.new_model(data.cfg)
            task.set_weights(model, ArrayRecord(torch_state_dict={
                kk: torch.from_numpy(np.asarray(v, dtype=np.float32))
                for kk, v in weights.items()}))
            metrics, _ = task.evaluate(model, data.cfg, data.tokenizer, data.test_rows,
                                       data.test_enc)
            eval_s += time.perf_counter() - t_eval
        return {"rounds_s": time.perf_counter() - t0, "test_loss": metrics["loss"],
                "central_eval_s": eval_s}


def _warm(rc: dict[str, Any]) -> None:
    """Imports in each worker before the clock starts (Flower's start-up is timed apart)."""
    from federation import task  # noqa: F401
    from federation.settings import parse_run_config  # noqa: F401


def fab_build_times(stage: Path) -> dict[str, Any]:
    """Flower's FAB build from the repository (what ``flwr run .`` does: it lists every file
    under the app directory, a .venv included) and from :func:`stage_app`'s copy."""
    from flwr.cli.build import build_fab_from_disk

    from federation.flwr_local import stage_app

    t0 = time.perf_counter()
    build_fab_from_disk(ROOT)
    t1 = time.perf_counter()
    build_fab_from_disk(stage_app(ROOT, stage))
    t2 = time.perf_counter()
    files = sum(len(f) for _, _, f in os.walk(ROOT))
    return {"fab_build_s_repo": round(t1 - t0, 3), "fab_build_s_staged": round(t2 - t1, 3),
            "files_in_repo": files}


# ---- memory of a process tree ---------------------------------------------------------------
class PeakRSS(threading.Thread):
    """Sum of VmRSS over the PIDs ``pids()`` returns, sampled until stopped; keeps the peak."""

    def __init__(self, pids: Any, every: float = 0.25):
        super().__init__(daemon=True)
        self.pids, self.every, self.peak_mb, self.peak_procs = pids, every, 0.0, 0
        self._stop_evt = threading.Event()

    def run(self) -> None:
        while not self._stop_evt.is_set():
            total, n = 0, 0
            for pid in self.pids():
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1])
                            n += 1
                except OSError:
                    pass
            if total / 1024 > self.peak_mb:
                self.peak_mb, self.peak_procs = total / 1024, n
            time.sleep(self.every)

    def stop(self) -> None:
        self._stop_evt.set()
        self.join()


def simulate(rc_text: str, n: int, rounds: int, workdir: Path, memory: bool = False,
             warm: bool = False) -> dict[str, Any]:
    """``flwr run .`` with ``n`` supernodes; times from the run's own round timestamps.

    ``warm``: a small run first, against the same local SuperLink, as a user's second
    ``flwr run`` finds it (Flower leaves it running); the measured run then skips starting
    the SuperLink and its SuperExec."""
    from federation.flwr_local import LocalSimulation
    from safelm import rundir

    out = workdir / "global"
    with LocalSimulation(ROOT, workdir / "flwr") as sim:
        if warm:
            res = sim.run(f'out-dir="{workdir / "warm-up"}" corpus-size=800 local-epochs=1 '
                          f'num-server-rounds=1 min-nodes={n}', num_supernodes=n,
                          cpus_per_client=1, timeout=600)
            if sim.crashed(res):
                raise SystemExit("the warm-up run failed:\n" + (res.stdout + res.stderr)[-3000:])
        mon = PeakRSS(sim.leftover_pids) if memory else None
        if mon:
            mon.start()
        t_launch = time.time()
        res = sim.run(f'out-dir="{out}" {rc_text}', num_supernodes=n, cpus_per_client=1,
                      timeout=3000)
        t_exit = time.time()
        stopped = sim.stop()
        t_stopped = time.time()
        if mon:
            mon.stop()
        if sim.crashed(res):
            raise SystemExit("the simulation failed:\n" + (res.stdout + res.stderr)[-3000:])
    recs = [r for r in rundir.read_metrics(out) if r["kind"] == "round"]
    assert len(recs) == rounds, f"{len(recs)} of {rounds} rounds ran"
    # Round 1 is sent as soon as the ServerApp is ready, but Ray's actors are still starting
    # then (worker processes, runtime env, the ClientApp's imports): clients begin seconds
    # later. That wait is Flower's start-up, not round time (the plain side's pool is warm
    # before its clock starts), so the rounds are timed from the first client's start.
    first_client = min(c["started_at"] for c in recs[0]["clients"] if "started_at" in c)
    out_d = {"rounds_s": recs[-1]["t_end"] - first_client,
             "startup_s": first_client - t_launch,
             "serverapp_ready_s": recs[0]["t_start"] - t_launch,
             "actor_wait_s": first_client - recs[0]["t_start"],
             "teardown_s": (t_exit - recs[-1]["t_end"]) + (t_stopped - t_exit),
             "teardown_flwr_exit_s": t_exit - recs[-1]["t_end"],
             "superlink_stop_s": t_stopped - t_exit, "stopped_pids": len(stopped),
             "test_loss": recs[-1]["test"]["test_loss"],
             "serverapp_setup_s": {k: round(v, 2) for k, v in
                                   rundir.read_metrics(out)[0].get("setup", {}).items()},
             "train_seconds_in_clients": sum(c.get("train_seconds", 0.0)
                                             for r in recs for c in r["clients"])}
    if mon:
        out_d.update(peak_memory_mb=round(mon.peak_mb, 1), peak_processes=mon.peak_procs)
    return out_d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small loads (a smoke test)")
    ap.add_argument("--skip-a", action="store_true")
    ap.add_argument("--skip-b", action="store_true")
    ap.add_argument("--warm", action="store_true",
                    help="(a) also against a SuperLink left running by an earlier flwr run")
    ap.add_argument("--startup-runs", type=int, default=0, metavar="N",
                    help="(a) N more simulations of 1 round and 1 local epoch, the same clients "
                         "and data, for the spread of start-up and teardown")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=6, help="(a): local epochs per round")
    ap.add_argument("--rows", type=int, default=16000, help="(a): rows of the bundled corpus")
    args = ap.parse_args()
    from federation.local import app_run_config

    result: dict[str, Any] = {}
    print(f"cores {os.cpu_count()}, load average (1 min) {os.getloadavg()[0]:.2f}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-fl-"))
    k, r = args.clients, args.rounds
    # 16,000 rows x 6 local epochs: about a minute of training per side on an idle 2-core
    # machine, so that training dominates as the comparison needs (4,000 rows gave 16 s).
    epochs, size = (1, 800) if args.quick else (args.epochs, args.rows)
    load = [f"local-epochs={epochs}", f"corpus-size={size}", f"num-server-rounds={r}",
            f"min-nodes={k}", "fraction-evaluate=0.0", "client-threads=1"]
    if not args.skip_a:
        workers = min(k, mp.cpu_count())
        print(f"(a) {k} clients x {r} rounds, {epochs} local epochs on {size} rows; "
              f"{workers} workers of 1 thread on both sides", flush=True)
        sim = simulate(" ".join(load), k, r, work / "a")
        print(f"  flwr simulation: rounds {sim['rounds_s']:.1f} s, start-up "
              f"{sim['startup_s']:.1f} s (ServerApp ready after {sim['serverapp_ready_s']:.1f}"
              f" s, of which its own set-up {sim['serverapp_setup_s']}; then "
              f"{sim['actor_wait_s']:.1f} s until Ray's actors began round 1), teardown "
              f"{sim['teardown_s']:.1f} s, test loss {sim['test_loss']:.4f}", flush=True)
        fab = fab_build_times(work / "staged")
        print(f"  flwr run's packaging of the app (FAB): {fab['fab_build_s_repo']:.2f} s from "
              f"the repository as it is ({fab['files_in_repo']} files under it), "
              f"{fab['fab_build_s_staged']:.2f} s from LocalSimulation's staged copy",
              flush=True)
        plain = plain_rounds(app_run_config(ROOT / "pyproject.toml", load), k, r, workers)
        print(f"  plain Python pool: rounds {plain['rounds_s']:.1f} s (central evaluation "
              f"{plain['central_eval_s']:.1f} s), test loss {plain['test_loss']:.4f}",
              flush=True)
        if args.warm:
            warm = simulate(" ".join(load), k, r, work / "a-warm", warm=True)
            print(f"  flwr simulation, SuperLink already running: rounds {warm['rounds_s']:.1f}"
                  f" s, start-up {warm['startup_s']:.1f} s (ServerApp ready after "
                  f"{warm['serverapp_ready_s']:.1f} s), teardown {warm['teardown_s']:.1f} s",
                  flush=True)
        result["simulation_vs_plain"] = {
            "time_ratio": round(sim["rounds_s"] / plain["rounds_s"], 3),
            "time_ratio_with_startup_teardown": round(
                (sim["rounds_s"] + sim["startup_s"] + sim["teardown_s"]) / plain["rounds_s"], 3),
            "startup_s": round(sim["startup_s"], 2), "teardown_s": round(sim["teardown_s"], 2),
            "serverapp_ready_s": round(sim["serverapp_ready_s"], 2),
            "actor_wait_s": round(sim["actor_wait_s"], 2),
            "simulation_rounds_s": round(sim["rounds_s"], 2),
            "plain_rounds_s": round(plain["rounds_s"], 2),
            "test_loss_simulation": round(sim["test_loss"], 4),
            "test_loss_plain": round(plain["test_loss"], 4),
            "serverapp_setup_s": sim["serverapp_setup_s"], **fab,
            "clients": k, "rounds": r}
        if args.startup_runs:
            one = [x if not x.startswith(("local-epochs=", "num-server-rounds=")) else
                   x.split("=")[0] + "=1" for x in load]
            runs = [simulate(" ".join(one), k, 1, work / f"a-start{i}")
                    for i in range(args.startup_runs)]
            ups = [sim["startup_s"]] + [x["startup_s"] for x in runs]
            downs = [sim["teardown_s"]] + [x["teardown_s"] for x in runs]
            print(f"  start-up over {len(ups)} runs: median {float(np.median(ups)):.1f} s, "
                  f"{min(ups):.1f}-{max(ups):.1f} s; teardown median "
                  f"{float(np.median(downs)):.1f} s, max {max(downs):.1f} s", flush=True)
            result["simulation_vs_plain"].update(
                startup_s_runs=[round(x, 2) for x in ups],
                startup_s_median=round(float(np.median(ups)), 2),
                teardown_s_runs=[round(x, 2) for x in downs])
        if args.warm:
            result["simulation_vs_plain"].update(
                startup_s_warm=round(warm["startup_s"], 2),
                time_ratio_warm=round(warm["rounds_s"] / plain["rounds_s"], 3))
    if not args.skip_b:
        rounds_b = 2 if args.quick else 3
        print(f"(b) 100 clients, 10 sampled per round, {rounds_b} rounds", flush=True)
        cfg_b = ("model.n_layer=1 model.d_model=32 model.n_head=4 corpus-size=6000 "
                 f"num-server-rounds={rounds_b} fraction-train=0.1 fraction-evaluate=0.1 "
                 "min-nodes=10 local-epochs=1 client-threads=1")
        t0 = time.perf_counter()
        b = simulate(cfg_b, 100, rounds_b, work / "b", memory=True)
        wall = time.perf_counter() - t0
        print(f"  completed in {wall:.1f} s; peak memory {b['peak_memory_mb']:.0f} MB over "
              f"{b['peak_processes']} processes", flush=True)
        result["clients_100_sample_10"] = {
            "completed": True, "rounds": rounds_b, "wall_s": round(wall, 1),
            "rounds_s": round(b["rounds_s"], 2), "startup_s": round(b["startup_s"], 2),
            "peak_memory_mb": b["peak_memory_mb"], "peak_processes": b["peak_processes"]}
    result["load_avg_1min"] = round(os.getloadavg()[0], 2)
    print(f"load average (1 min) at the end: {result['load_avg_1min']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
