"""``safelm explain``: per-token attributions of a classifier's predictions (integrated
gradients through Captum, attention beside them) and a faithfulness test; the fairness
audit's ``--explain RUN`` (``groups.py``) uses the same rows."""
