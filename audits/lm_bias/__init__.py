"""LM bias probes: counterfactual likelihood preferences and generation sentiment by group
(``audit.py``), offline lexicon scorer (``lexicon.py``), probe sets in ``audits/probes``.
Import-light: ``cli.py`` is imported whenever ``safelm`` builds its parser."""
