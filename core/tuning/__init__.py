"""Settings chosen from normal images alone, checked against the defaults and measured on the development lines.

:mod:`.synthetic` paints defects, :mod:`.nuisance` makes normal variation, :mod:`.proxy` builds the proxy set
and scores a fitted geometry on it, :mod:`.pixel_counts` gives fast pixel metrics and their bootstrap,
:mod:`.search` chooses, :mod:`.fidelity` measures how far the proxy can be trusted.
"""

from core.tuning.proxy import Candidate
from core.tuning.search import TuneResult, best_candidates, tune_spade
from core.tuning.synthetic import KINDS, SyntheticDefect, paint

__all__ = ["Candidate", "KINDS", "SyntheticDefect", "TuneResult", "best_candidates", "paint", "tune_spade"]
