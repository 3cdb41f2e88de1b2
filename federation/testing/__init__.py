"""Test and benchmark harness for the Flower app: fault injection and hostile clients.

Not part of the app that nodes run: ``[tool.flwr.app] fab-exclude`` keeps this package (and
``deploy.py``, ``flwr_local.py``, ``local.py``) out of the FAB, and the production ClientApp
(:mod:`federation.client_app`) never imports it. Tests and benchmarks run
:data:`federation.testing.client_app.app`, the same handlers with :func:`faults.fault_mod`.
"""
