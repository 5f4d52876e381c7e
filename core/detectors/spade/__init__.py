"""SPADE segmentation (see :mod:`core.detectors.spade.detector`).

The parts, each a value with one job: :mod:`.featurizer` (backbone stages ->
per-cell features), :mod:`.gallery` and :mod:`.index` (what a fit learns:
exact, K-means, IVF or Gaussian galleries, and the search), :mod:`.calibration`
(normal maps -> normalisation and pixel thresholds), :mod:`.image_score`
(image-level rules), :mod:`.working_point` (the normal scores the image
threshold is set on, nuisance copies included), :mod:`.explain` (the nearest
normal patch of a pixel), :mod:`.training_images` (what the model remembers of
its normal images), :mod:`.raw_cache` (the raw maps of scored images, in
memory and in a file, so moving σ or a layer toggle never touches the backbone
or the kNN again), :mod:`.heatmaps` (raw maps -> heatmaps) and
:mod:`.model_file` (what a model file holds). :mod:`.detector` combines them:
fit, score, maps, thresholds, save/load.
"""

from core.detectors.spade.detector import SpadeDetector
from core.detectors.spade.heatmaps import REFERENCE_CROP
from core.detectors.spade.explain import Explanation
from core.detectors.spade.gallery import GalleryTooLargeError

__all__ = ["REFERENCE_CROP", "Explanation", "GalleryTooLargeError", "SpadeDetector"]
