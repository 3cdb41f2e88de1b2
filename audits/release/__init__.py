"""Releases: ``safelm release RUN_DIR --out DIR`` packages a trained model with its model
card and manifest, and ``safelm verify DIR [--policy FILE]`` checks it.

A release dir holds ``model.safetensors``, ``config.json``, ``tokenizer.json``,
``privacy.json`` (DP runs), ``MODEL_CARD.md``, ``MODEL_CARD.html``, ``release.json`` and
``release.sha256``; how these protect every byte is in :mod:`audits.release.manifest`, the
policy keys in :mod:`audits.release.policy`. ``safelm.api.load_run`` loads a release dir like
a run dir (so ``safelm predict``/``generate`` work on it) and refuses one whose hashes differ.
"""
