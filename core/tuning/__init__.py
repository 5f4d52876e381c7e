"""Settings chosen from normal images alone: synthetic defects (:mod:`.synthetic`) and the search (:mod:`.search`)."""

from core.tuning.search import Candidate, TuneResult, tune_spade
from core.tuning.synthetic import KINDS, SyntheticDefect, paint

__all__ = ["Candidate", "KINDS", "SyntheticDefect", "TuneResult", "paint", "tune_spade"]
