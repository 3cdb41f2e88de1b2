"""Privacy audits of a SafeLM run: membership inference (loss and reference-model attacks),
an honest empirical lower bound on epsilon checked against the accountant's claim, and the
exposure of planted canaries; JSON / Markdown / HTML reports.

Entry points: :func:`audits.privacy.audit.privacy_audit` (Python), ``safelm audit privacy``
(``audits/privacy/cli.py``) and :func:`audits.privacy.demo.demo_step`. This ``__init__`` stays
import-light: ``safelm --help`` loads the plugin.
"""
