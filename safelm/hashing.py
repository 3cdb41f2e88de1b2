"""File fingerprints (torch-free, so audits and release checks can import it cheaply).

Also the predictions sidecar: ``safelm predict`` writes ``<table>.meta.json`` beside a
predictions table, recording the sha256 of the weights that made it. The table itself keeps
the column layout of docs/design.md (any model's predictions can be audited), so the model's
identity travels beside it rather than inside it. The sidecar also records the table's own
sha256: a table edited or regenerated without its sidecar no longer matches, and then counts as
coming from an unknown model rather than silently inheriting the old hash.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any

HF_DIR = "hf"  # a release's transformers copy (safelm export hf): hf/<file>


def listed_name_ok(name: str) -> bool:
    """A file a listing may name: a plain name in the dir, or ``hf/<name>`` (never a path
    that leaves the dir)."""
    parts = name.split("/")
    if len(parts) == 2 and parts[0] == HF_DIR:
        parts = parts[1:]
    return len(parts) == 1 and parts[0] not in ("", ".", "..") and "\\" not in parts[0]


META_SUFFIX = ".meta.json"
META_KIND = "safelm-predictions-meta"


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, streamed in 1 MiB chunks (data files can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def meta_path(table: str | Path) -> Path:
    """Where the sidecar of predictions table ``table`` lives: ``<table>.meta.json``."""
    p = Path(table)
    return p.with_name(p.name + META_SUFFIX)


def predictions_meta(table_sha256: str, model_sha256: str, **extra: Any) -> dict[str, Any]:
    """The sidecar's content (docs/design.md, "Files")."""
    return {"kind": META_KIND, "model_sha256": model_sha256,
            "predictions_sha256": table_sha256, **extra,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def write_meta_tmp(table: Path, meta: dict[str, Any]) -> Path:
    """Write the sidecar under a temporary name (the caller renames it with the table)."""
    tmp = meta_path(table).with_name(meta_path(table).name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return tmp


def read_model_sha256(table: str | Path) -> tuple[str | None, str | None]:
    """(model sha256, None) when ``table`` has a sidecar that describes exactly these bytes;
    (None, why not) otherwise. Never raises for a missing or stale sidecar: the model behind
    a table from elsewhere is simply unknown, and reports say so."""
    side = meta_path(table)
    if not side.is_file():
        return None, (f"no sidecar {side.name} beside the table: the model that made these "
                      "predictions is unknown (write tables with 'safelm predict')")
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return None, f"sidecar {side.name} is unreadable ({type(e).__name__}): model unknown"
    model = meta.get("model_sha256") if isinstance(meta, dict) else None
    if not isinstance(model, str) or len(model) != 64:
        return None, f"sidecar {side.name} records no model_sha256: model unknown"
    if meta.get("predictions_sha256") != file_sha256(table):
        return None, (f"sidecar {side.name} describes another version of the table (its "
                      "predictions_sha256 differs): the table was changed after 'safelm "
                      "predict', so its model is unknown")
    return model, None


def replace_with_meta(tmp_table: Path, table: Path, meta_tmp: Path | None) -> None:
    """Move a written table (and its sidecar, or remove a stale one) into place."""
    os.replace(tmp_table, table)
    if meta_tmp is not None:
        os.replace(meta_tmp, meta_path(table))
    elif meta_path(table).exists():
        meta_path(table).unlink()  # a sidecar of an earlier table would describe other bytes
