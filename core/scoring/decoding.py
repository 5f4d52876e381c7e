"""One source decoded for scoring: the piece the thread pool, the decoding processes and the Ray engine share.

Its own module so that :mod:`~core.scoring.stream` (which starts the decoders)
and :mod:`~core.scoring.decode_processes` (whose workers run them) both import
it, and neither imports the other back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.images import ImageError, ImageSize, preprocess
from core.scoring.inputs import Source, load_source


@dataclass
class Decoded:
    """One source after decoding: ``image`` (H, W, 3) uint8 and ``tensor`` (3, crop, crop) float32, or an ``error``."""

    source: Source
    image: np.ndarray | None = None
    tensor: np.ndarray | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


def decode_one(source: Source, size: ImageSize, keep_image: bool = False) -> Decoded:
    """Decode and preprocess one source; a bad file becomes ``Decoded(error=...)``, never an exception."""
    try:
        image = load_source(source)
        tensor = preprocess(image, size)
    except ImageError as error:
        return Decoded(source, error=error.reason)
    except (OSError, ValueError, MemoryError) as error:  # anything else a broken file can raise
        return Decoded(source, error=f"cannot be read ({type(error).__name__}: {error})")
    return Decoded(source, image if keep_image else None, tensor)
