"""Visual anomaly detection and segmentation with pretrained deep features.

Methods: DN2 and PANDA (Reiss et al., CVPR 2021), SPADE (Cohen & Hoshen, as
evaluated in the PANDA paper), and the Gaussian / Mahalanobis model of Rippel et
al. (ICPR 2020). This package never imports a UI toolkit; the Streamlit
dashboard lives in ``dashboard/``.

Submodules are imported on use (``from core.detectors import make_detector``),
so ``import core`` stays cheap.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
