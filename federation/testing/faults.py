"""Fault injection and poisoning for robustness tests, as a Flower mod.

The run-config keys ``attack``, ``attack-clients``, ``attack-scale``, ``fail-clients`` and
``fail-rounds`` (documented in :data:`federation.settings.FEDERATION_KEYS`) are acted on here
only; the production ClientApp ignores them.
"""

from __future__ import annotations

from collections import OrderedDict

from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from ..settings import parse_run_config


def poison(global_arrays: ArrayRecord, local: ArrayRecord, attack: str,
           scale: float) -> ArrayRecord:
    """A hostile client's update: ``g - s (w - g)`` (signflip) or ``g + s (w - g)`` (scale)."""
    factor = -scale if attack == "signflip" else scale
    g, w = global_arrays.to_torch_state_dict(), local.to_torch_state_dict()
    return ArrayRecord(torch_state_dict=OrderedDict(
        (k, g[k] + factor * (w[k] - g[k])) for k in w))


def fault_mod(msg: Message, ctx: Context, call_next: ClientAppCallable) -> Message:
    """Around a train handler: after local training, raise for ``fail-clients`` (in
    ``fail-rounds``, or every round), and poison the reply of ``attack-clients``."""
    reply = call_next(msg, ctx)
    if reply.has_error():
        return reply
    _, fed = parse_run_config(ctx.run_config)
    pid = int(ctx.node_config["partition-id"])
    rnd = int(msg.content["config"]["server-round"])
    if pid in fed.ids("fail-clients") and (not fed.ids("fail-rounds")
                                           or rnd in fed.ids("fail-rounds")):
        raise RuntimeError(f"injected failure: client {pid} in round {rnd} (fail-clients)")
    if fed.attack != "none" and pid in fed.ids("attack-clients"):
        reply.content["arrays"] = poison(msg.content["arrays"], reply.content["arrays"],
                                         fed.attack, fed.attack_scale)
    return reply
