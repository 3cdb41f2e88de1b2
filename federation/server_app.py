"""The ServerApp: a thin adapter from Flower's runtime to :func:`federation.server.run_server`.

``run_server(grid, context)`` is the whole app (data, tokenizer, strategy, run dir, rounds),
so tests drive it with an in-process grid (:mod:`federation.local`) and ``flwr run .`` drives
it through this ServerApp.

Nothing heavy is imported here, on purpose: Flower's simulation process imports this module
under the same lock as the ClientApp's, which it loads before it starts Ray; torch and
safelm imported here held Ray's start back by their import time (~1.5 s). They are imported
when the app runs instead, while Ray starts.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from .server import run_server

    run_server(grid, context)
