"""An in-process Grid: the real ServerApp and ClientApp, with messages passed as calls.

Why: Flower's simulation engine costs a fixed 10-15 s (SuperLink, Ray) per run, which is
right for ``flwr run .`` but too slow for unit tests of the round logic, resume, faults and
strategies. :class:`LocalGrid` implements Flower's ``Grid`` interface by calling the
ClientApp directly with a per-node ``Context`` (node config ``partition-id`` /
``num-partitions``, and a ``state`` RecordDict that persists across rounds exactly as on a
SuperNode). A ClientApp exception becomes an error reply, as Flower's runtime makes it.
Clients run one after another in this process; nothing is parallel and no thread counts
change unless the run-config asks.
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE = 1


class LocalGrid(Grid):
    """``num_nodes`` simulated SuperNodes with ids 1001, 1002, ... running ``client_app``."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: dict[str, Any],
                 node_configs: list[dict[str, Any]] | None = None,
                 vanish: dict[int, set[int]] | None = None) -> None:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SERVER_NODE, 1
        self.app = client_app
        self.contexts = {
            1001 + i: Context(run_id=1, node_id=1001 + i,
                              node_config={"partition-id": i, "num-partitions": num_nodes,
                                           **((node_configs or [{}] * num_nodes)[i])},
                              state=RecordDict(), run_config=dict(run_config))
            for i in range(num_nodes)}
        self.vanish = vanish or {}  # round -> partition ids that never answer that round
        self.calls: list[tuple[int, str]] = []

    # Grid interface ---------------------------------------------------------------------
    def set_run(self, run: Any) -> None:  # noqa: D102 - the run is fixed
        return None

    @property
    def run(self) -> Any:  # pragma: no cover - not used by the ServerApp
        raise NotImplementedError

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id,
                       group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("LocalGrid only supports send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("LocalGrid only supports send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            ctx = self.contexts[node]
            rnd = int(msg.content["config"].get("server-round", 0)) if "config" in \
                msg.content else 0
            self.calls.append((node, msg.metadata.message_type))
            if ctx.node_config["partition-id"] in self.vanish.get(rnd, set()):
                continue  # vanished: no reply at all, as after a timeout
            incoming = Message(content=copy.deepcopy(msg.content),
                               message_type=msg.metadata.message_type, dst_node_id=node)
            try:
                replies.append(self.app(incoming, ctx))
            except Exception as e:  # what Flower's runtime turns into an error reply
                replies.append(Message(Error(code=3, reason=f"{type(e).__name__}: {e}"),
                                       reply_to=incoming))
        return replies


def app_run_config(pyproject: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """``[tool.flwr.app.config]`` flattened, with ``--run-config``-style overrides applied by
    Flower's own parser (so tests and ``flwr run`` read values identically)."""
    from flwr.common.config import flatten_dict, fuse_dicts, parse_config_args

    tree = tomllib.loads(Path(pyproject).read_text(encoding="utf-8"))
    base = flatten_dict(tree["tool"]["flwr"]["app"]["config"])
    # One string, later keys winning: Flower parses each --run-config argument as its own TOML
    # document and merges them shallowly, so `-c model.a=1 -c model.b=2` loses model.a.
    last = {item.split("=", 1)[0].strip(): item for item in overrides or []}
    return fuse_dicts(base, parse_config_args([" ".join(last.values())] if last else []))


def run_local(run_config: dict[str, Any], num_nodes: int, **grid_kwargs: Any
              ) -> tuple[dict[str, Any], LocalGrid]:
    """The ServerApp over a :class:`LocalGrid`; returns the last central test metrics."""
    from .testing.client_app import app as client_app  # production handlers + fault mod
    from .server import run_server

    grid = LocalGrid(client_app, num_nodes, run_config, **grid_kwargs)
    ctx = Context(run_id=1, node_id=SERVER_NODE, node_config={}, state=RecordDict(),
                  run_config=dict(run_config))
    return run_server(grid, ctx), grid
