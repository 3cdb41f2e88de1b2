"""Dealing rows to federated clients: IID, Dirichlet over a column, natural by user.

Every function returns an ``int`` array ``client[i]`` (the client of row ``i``), computed from
the rows and a seed alone. Every node recomputes the same assignment and keeps its own rows,
so no coordinator has to ship indices and a client never sees another client's rows.

* ``iid``: a seeded permutation dealt round-robin (sizes differ by at most one).
* ``dirichlet``: for each value ``v`` of a column (the label, or a demographic group column),
  client proportions ``p_v ~ Dir(alpha * 1)``; the rows with value ``v`` are cut by ``p_v``
  (Hsu et al. 2019, "Measuring the effects of non-identical data distribution"). Large alpha
  gives every client the global mix; alpha -> 0 gives each value to one client. Draws are
  repeated (new seed stream) until every client has ``min_size`` rows, as flwr-datasets does.
* ``natural``: each user (a value of the user column) goes whole to one client, users dealt
  round-robin in seeded order, so clients are disjoint in users -- the realistic cross-device
  case, and what user-level privacy needs.

:func:`partition_table` and :func:`write_partition_report` write the sizes and mixes out
(CSV and a stacked-bar PNG) so that a run's heterogeneity is visible, not assumed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from safelm.errors import UserError


def iid(n: int, num_clients: int, seed: int) -> np.ndarray:
    """Rows dealt round-robin over a seeded permutation."""
    _check(n, num_clients)
    order = np.random.default_rng(seed).permutation(n)
    client = np.empty(n, dtype=np.int64)
    client[order] = np.arange(n) % num_clients
    return client


def dirichlet(values: np.ndarray | pd.Series, num_clients: int, alpha: float, seed: int,
              min_size: int = 1, max_tries: int = 100) -> np.ndarray:
    """Per value of ``values``, split its rows over clients by ``Dir(alpha)`` proportions."""
    values = np.asarray(values)
    n = len(values)
    _check(n, num_clients)
    if alpha <= 0:
        raise UserError(f"alpha={alpha} must be > 0")
    if n < num_clients * min_size:
        raise UserError(f"{n} rows cannot give {num_clients} clients {min_size} row(s) each; "
                        "use fewer clients or more data")
    uniq = np.unique(values)
    ss = np.random.SeedSequence(seed)
    for child in ss.spawn(max_tries):
        rng = np.random.default_rng(child)
        client = np.empty(n, dtype=np.int64)
        for v in uniq:
            rows = rng.permutation(np.flatnonzero(values == v))
            p = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(p)[:-1] * len(rows)).round().astype(int)
            for c, part in enumerate(np.split(rows, cuts)):
                client[part] = c
        if np.bincount(client, minlength=num_clients).min() >= min_size:
            return client
    raise UserError(f"no Dirichlet(alpha={alpha}) draw in {max_tries} tries gave each of "
                    f"{num_clients} clients {min_size} row(s); raise alpha or use fewer clients")


def natural(users: np.ndarray | pd.Series, num_clients: int, seed: int) -> np.ndarray:
    """Each user's rows go to one client; users dealt round-robin in seeded order."""
    users = np.asarray(users).astype(str)
    uniq = np.unique(users)
    if len(uniq) < num_clients:
        raise UserError(f"natural partitioning needs at least one user per client: "
                        f"{len(uniq)} users for {num_clients} clients")
    order = np.random.default_rng(seed).permutation(len(uniq))
    user_client = np.empty(len(uniq), dtype=np.int64)
    user_client[order] = np.arange(len(uniq)) % num_clients
    return user_client[np.searchsorted(uniq, users)]


def assign(rows: pd.DataFrame, method: str, num_clients: int, seed: int, *,
           alpha: float = 0.5, column: str = "") -> np.ndarray:
    """The client of every row of ``rows`` by ``method`` (see the module docstring).

    ``column`` is the label column for ``dirichlet-label`` (default ``label``), the group
    column for ``dirichlet-group`` and the user column for ``natural`` (default ``user``).
    """
    if method == "iid":
        return iid(len(rows), num_clients, seed)
    col = column or {"dirichlet-label": "label", "natural": "user"}.get(method, "")
    if not col or col not in rows.columns:
        raise UserError(f"partitioning={method} needs a column{f' {col!r}' if col else ''} "
                        f"in the data (columns: {', '.join(map(str, rows.columns))}); set "
                        "run-config partition-col, data.group_cols or data.user_col")
    if method in ("dirichlet-label", "dirichlet-group"):
        return dirichlet(rows[col].to_numpy(), num_clients, alpha, seed)
    if method == "natural":
        return natural(rows[col].to_numpy(), num_clients, seed)
    raise UserError(f"unknown partitioning {method!r}; use iid, dirichlet-label, "
                    "dirichlet-group or natural")


def partition_table(client: np.ndarray, rows: pd.DataFrame, columns: list[str],
                    num_clients: int) -> pd.DataFrame:
    """One row per client: its size and, per column, the count of each value."""
    table = pd.DataFrame({"client": np.arange(num_clients),
                          "rows": np.bincount(client, minlength=num_clients)})
    for col in columns:
        counts = pd.crosstab(client, rows[col].to_numpy()).reindex(range(num_clients),
                                                                    fill_value=0)
        for value in counts.columns:
            table[f"{col}={value}"] = counts[value].to_numpy()
    return table


def write_partition_table(table: pd.DataFrame, out: str | Path,
                          stem: str = "partitions") -> Path:
    """``stem.csv`` in ``out`` (atomic)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv = out / f"{stem}.csv"
    tmp = csv.with_name(csv.name + ".tmp")
    table.to_csv(tmp, index=False)
    os.replace(tmp, csv)
    return csv


def plot_partitions(table: pd.DataFrame, out: str | Path, stem: str = "partitions",
                    title: str = "") -> Path:
    """``stem.png`` in ``out`` (atomic): one stacked-bar panel per column of the table."""
    import matplotlib
    matplotlib.use("Agg")  # headless: servers and CI have no display
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{stem}.png"
    cols = sorted({c.split("=", 1)[0] for c in table.columns if "=" in c})
    panels = cols or ["rows"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.2), squeeze=False)
    for ax, col in zip(axes[0], panels):
        parts = [c for c in table.columns if c.startswith(f"{col}=")] or ["rows"]
        bottom = np.zeros(len(table))
        for part in parts:
            ax.bar(table["client"], table[part], bottom=bottom, label=part.split("=", 1)[-1])
            bottom += table[part].to_numpy()
        ax.set_xlabel("client")
        ax.set_ylabel("rows")
        ax.set_title(col)
        if len(parts) <= 12:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp_png = png.with_name(png.stem + ".tmp.png")
    fig.savefig(tmp_png, dpi=90)
    plt.close(fig)
    os.replace(tmp_png, png)
    return png


def write_partition_report(table: pd.DataFrame, out: str | Path, stem: str = "partitions",
                           title: str = "") -> tuple[Path, Path]:
    """``stem.csv`` and ``stem.png`` (one stacked-bar panel per column) in ``out``."""
    return write_partition_table(table, out, stem), plot_partitions(table, out, stem, title)


def _check(n: int, num_clients: int) -> None:
    if num_clients < 1:
        raise UserError(f"num-partitions={num_clients} must be >= 1")
    if n < num_clients:
        raise UserError(f"{n} rows cannot be dealt to {num_clients} clients; use fewer "
                        "clients or more data")
