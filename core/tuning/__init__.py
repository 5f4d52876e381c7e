"""Settings chosen from normal images alone: synthetic defects (:mod:`.synthetic`) and the search (:mod:`.search`)."""

from core.tuning.search import Candidate, TuneResult, best_candidates, tune_spade
from core.tuning.synthetic import KINDS, SyntheticDefect, paint

__all__ = ["Candidate", "KINDS", "SyntheticDefect", "TuneResult", "best_candidates", "paint", "tune_spade"]
