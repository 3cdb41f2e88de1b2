"""Live monitoring: mirror ``metrics.jsonl`` records to TensorBoard and MLflow as they are logged.

``metrics.jsonl`` stays the record of a run; these are views of it for watching a long run:

* ``train.tensorboard=true`` writes TensorBoard event files to ``RUN_DIR/tensorboard/``
  (``torch.utils.tensorboard``; needs the ``tensorboard`` package: ``pip install
  'safelm[monitor]'``). View with ``tensorboard --logdir RUN_DIR/tensorboard``.
* ``train.mlflow=true`` logs to a local MLflow store in the run dir, ``RUN_DIR/mlflow.db``
  (SQLite: MLflow 3 keeps its ``./mlruns`` file store in maintenance mode and refuses it by
  default; nothing is sent anywhere; needs ``mlflow`` or ``mlflow-skinny``: ``pip install
  'safelm[mlflow]'``). View with ``mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow.db``.
  MLflow metric names cannot hold ``/``, so ``step/loss`` is logged as ``step_loss``. MLflow
  keeps every value it was sent: after ``--resume``, the steps between the checkpoint and the
  crash appear twice (the later value is the resumed run's).

Every numeric field of a record becomes the scalar ``<kind>/<field>`` at the record's ``step``
(federated round records use the round number): ``step/loss``, ``step/lr``,
``epoch/val_loss``, ``epoch/tokens_per_s``, ``epoch/epsilon`` (DP runs), ``round/...``. Nested
numeric fields are flattened with ``.`` (``round/bytes.sent``). On ``--resume`` the
TensorBoard writer purges events logged after the checkpoint (``purge_step``), as
``metrics.jsonl`` drops its own records past it, so the curves show one history.

Hand-written because neither library maps our records: this is only the mapping and the
missing-package message.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol

from .errors import UserError

TENSORBOARD_DIR, MLFLOW_DB = "tensorboard", "mlflow.db"
_SKIP = {"kind", "step", "epoch", "round"}


def scalars(record: dict[str, Any]) -> tuple[str, int | None, dict[str, float]]:
    """(kind, step, {name: value}) of a metrics record: every finite number, nested ones
    flattened with ``.``; booleans and strings are not scalars."""
    kind = str(record.get("kind", "record"))
    step = record.get("step", record.get("round"))
    out: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) \
                and math.isfinite(value):
            out[f"{kind}/{prefix}"] = float(value)

    for key, value in record.items():
        if key not in _SKIP and (kind != "test" or key.startswith("test_")):
            walk(key, value)  # a test record repeats the last epoch's: keep only test_*
    return kind, int(step) if isinstance(step, (int, float)) else None, out


class Sink(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class TensorBoardSink:
    """Event files under ``RUN_DIR/tensorboard/`` (one writer per run)."""

    def __init__(self, run_dir: Path, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError(_TB_MISSING) from None
        self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR),
                                    purge_step=purge_step)

    def write(self, record: dict[str, Any]) -> None:
        _, step, values = scalars(record)
        for name, value in values.items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()  # a live view: each record is visible as soon as it is logged

    def close(self) -> None:
        self.writer.close()


class MLflowSink:
    """A local MLflow store, ``RUN_DIR/mlflow.db`` (experiment ``safelm``, one MLflow run per
    SafeLM run, named after the run dir; a resumed run continues the same one)."""

    def __init__(self, run_dir: Path):
        try:
            import mlflow
        except ImportError:
            raise UserError(_MLFLOW_MISSING) from None
        self.mlflow = mlflow
        self.client = mlflow.tracking.MlflowClient(
            tracking_uri=f"sqlite:///{(run_dir / MLFLOW_DB).resolve()}")
        exp = self.client.get_experiment_by_name("safelm")
        exp_id = exp.experiment_id if exp else self.client.create_experiment("safelm")
        runs = self.client.search_runs([exp_id], max_results=1)
        self.run_id = runs[0].info.run_id if runs else \
            self.client.create_run(exp_id, run_name=run_dir.name).info.run_id

    def write(self, record: dict[str, Any]) -> None:
        _, step, values = scalars(record)
        for name, value in values.items():
            self.client.log_metric(self.run_id, name.replace("/", "_"), value, step=step or 0)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


_TB_MISSING = ("train.tensorboard=true needs the tensorboard package: pip install "
               "'safelm[monitor]' (or set train.tensorboard=false)")
_MLFLOW_MISSING = ("train.mlflow=true needs the mlflow package: pip install 'safelm[mlflow]' "
                   "(or set train.mlflow=false)")


def check_available(tensorboard: bool, mlflow: bool) -> None:
    """Exit 2 before a run starts when an asked-for sink's package is missing."""
    import importlib.util
    if tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UserError(_TB_MISSING)
    if mlflow and importlib.util.find_spec("mlflow") is None:
        raise UserError(_MLFLOW_MISSING)


def open_sinks(run_dir: str | Path | None, *, tensorboard: bool, mlflow: bool,
               purge_step: int | None = None) -> list[Sink]:
    """The sinks a run asked for (none without a run dir). A missing package exits 2."""
    if run_dir is None:
        return []
    run_dir = Path(run_dir)
    sinks: list[Sink] = []
    if tensorboard:
        sinks.append(TensorBoardSink(run_dir, purge_step))
    if mlflow:
        sinks.append(MLflowSink(run_dir))
    return sinks
