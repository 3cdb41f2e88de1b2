"""The ClientApp of tests and benchmarks: the production handlers plus :func:`fault_mod`.

The fault mod sits inside the client-side DP clipping mod, so a hostile update is clipped like
an honest one would be, as before the harness moved out of the production app.
"""

from __future__ import annotations

from flwr.clientapp import ClientApp

from .. import client_app as production
from .faults import fault_mod

app = ClientApp()
app.train(mods=[production.dp_clipping_mod, fault_mod])(production.train)
app.evaluate()(production.evaluate)
