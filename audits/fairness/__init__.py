"""Fairness audits of a predictions table: per-group and intersectional metrics on fairlearn's
MetricFrame, fast bootstrap intervals, flagged disparities, ThresholdOptimizer mitigation, a
paired comparison against a baseline run, and JSON / Markdown / HTML reports.

Entry points: :func:`audits.fairness.pipeline.fairness_audit` (Python) and
``safelm audit fairness`` (``audits/fairness/cli.py``). This ``__init__`` stays import-light:
``safelm --help`` loads the plugin, and it must not pay for pandas and fairlearn.
"""
