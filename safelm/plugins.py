"""Commands and demo steps that other packages add to ``safelm`` through entry points.

``safelm`` must not import ``audits`` or ``federation`` (docs/design.md), yet ``safelm audit`` and
``safelm release`` are subcommands of the one ``safelm`` command and the demo ends with an
audit. Packages therefore plug in the way pytest plugins do: an entry point in the group
``safelm.plugins`` names a module that may define

* ``register(subparsers) -> dict[str, Callable[[argparse.Namespace], int]]``: add
  subcommands and return their handlers by command name;
* ``demo_step(ctx: dict) -> None`` and ``DEMO_ORDER: int``: run after the core demo, in
  ``DEMO_ORDER``; ``ctx`` holds the demo's paths and results, and steps may add to it.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from types import ModuleType

GROUP = "safelm.plugins"


def load_plugins() -> list[ModuleType]:
    mods = [ep.load() for ep in entry_points(group=GROUP)]
    return sorted(mods, key=lambda m: (getattr(m, "DEMO_ORDER", 100), m.__name__))
