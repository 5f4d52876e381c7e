"""SPADE segmentation (see :mod:`core.detectors.spade.detector`).

Modules: ``detector`` (:class:`SpadeDetector`), ``gallery`` (normal-pixel
galleries: building and search through :mod:`core.knn`), ``raw_cache`` (the
LRU raw-map cache and the raw-map file), ``explain`` (:class:`Explanation`).
"""

from core.detectors.spade.detector import SpadeDetector
from core.detectors.spade.heatmaps import REFERENCE_CROP
from core.detectors.spade.explain import Explanation
from core.detectors.spade.gallery import GalleryTooLargeError

__all__ = ["REFERENCE_CROP", "Explanation", "GalleryTooLargeError", "SpadeDetector"]
