"""``safelm demo`` step: a small federated training of the demo's sentiment classifier.

Registered as a ``safelm.plugins`` entry point (``federation = "federation.plugin"``), so
``safelm`` never imports ``federation``. The full demo runs Flower's own simulation engine
(``flwr run .``, 4 clients, Ray); ``--quick`` runs the same ServerApp and ClientApp over the
in-process grid (:mod:`federation.local`) to stay fast. Either way it prints one line per
round (loss, accuracy, per-group accuracy gap, replies) and where the global run dir is.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

DEMO_ORDER = 5  # after the core demo, before the audits
ROOT = Path(__file__).resolve().parents[1]


def demo_step(ctx: dict[str, Any]) -> None:
    from safelm import rundir

    from .flwr_local import LocalSimulation
    from .local import app_run_config, run_local
    from .server import summary_line

    pyproject = ROOT / "pyproject.toml"
    if "[tool.flwr.app]" not in (pyproject.read_text() if pyproject.is_file() else ""):
        print("\n[federated] skipped: the Flower app (pyproject.toml) is not next to the package")
        return
    quick = bool(ctx.get("quick"))
    out = Path(ctx["out"]).resolve() / "federated"
    if out.exists():
        import shutil
        if not (out / rundir.CONFIG).is_file():
            print(f"\n[federated] skipped: {out} exists and is not a run dir")
            return
        shutil.rmtree(out)
    rounds, clients = (2, 3) if quick else (3, 4)
    cfg = [f'out-dir="{out}"', f'data-path="{Path(ctx["data"]["sentiment"]).resolve()}"',
           f"num-server-rounds={rounds}", 'partitioning="dirichlet-group"', "alpha=0.5",
           f"min-nodes={clients}", "train.progress=\"off\""]
    if quick:
        cfg += ["model.n_layer=1", "model.d_model=32", "client-threads=1"]
    else:
        cfg += ["local-epochs=2"]
    how = "in-process grid" if quick else "Flower simulation engine (flwr run ., Ray)"
    print(f"\n[federated] {clients} clients x {rounds} rounds of FedAvg, Dirichlet(0.5) "
          f"over gender, {how}")
    t0 = time.perf_counter()
    if quick:
        logging.getLogger("flwr").setLevel(logging.WARNING)
        run_local(app_run_config(pyproject, cfg), clients)
    else:
        with LocalSimulation(ROOT) as sim:
            res = sim.run(" ".join(cfg), num_supernodes=clients, cpus_per_client=1,
                          timeout=1800)
        if sim.crashed(res):
            print("  the federated run failed; last lines:\n" +
                  "\n".join((res.stdout + res.stderr).splitlines()[-15:]))
            ctx.setdefault("verdicts", []).append(
                ("federated run", False, "the Flower simulation failed"))
            return
    for rec in rundir.read_metrics(out):
        if rec["kind"] == "round":
            print(f"  {summary_line(rec, rounds)}")
    print(f"  global run dir: {out} ({time.perf_counter() - t0:.0f} s); partitions: "
          f"{out / 'partitions.png'}")
    ctx["federated_run"] = out
    last = [r for r in rundir.read_metrics(out) if r["kind"] == "round"][-1]
    ctx["federated_test"] = json.loads(json.dumps(last["test"]))
