"""Run a backbone on overlapping tiles and stitch the feature maps.

Large inputs (a 640² board at native resolution, a line-scan strip) need not
go through the network in one piece: :class:`TiledExtractor` cuts the
preprocessed batch into overlapping square tiles, runs the wrapped extractor
on each, and writes every tile's feature cells back into one map per stage,
keeping from each tile only the cells nearest its centre (the overlap hides
the tiles' zero-padded borders). Detectors downstream see one feature map per
image, as if it had been computed whole, so galleries, kNN and heatmaps need
no change; an input no larger than a tile is passed through untouched.

Tile geometry is in input pixels and kept on multiples of :data:`ALIGN` (the
coarsest stride of the supported backbones) so every tile boundary falls on a
cell boundary of every stage.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from core.backbones import FeatureExtractor, Features

ALIGN = 32
"""Tile sides, starts and seams are multiples of this many input pixels (the largest stage stride)."""


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of side ``tile`` covering ``length`` pixels with at least ``overlap`` shared.

    The last tile ends exactly at ``length``; every start is a multiple of
    :data:`ALIGN` when ``length`` and ``tile`` are.
    """
    if length <= tile:
        return [0]
    step = max(ALIGN, (tile - overlap) // ALIGN * ALIGN)
    count = math.ceil((length - tile) / step) + 1
    starts = [min(i * step, length - tile) for i in range(count)]
    return sorted(set(starts))


def _seams(starts: list[int], tile: int, length: int) -> list[tuple[int, int]]:
    """(keep_from, keep_to) input pixels of each tile: cut half-way through each overlap, on ALIGN."""
    bounds = [0]
    for left, right in zip(starts, starts[1:]):
        middle = (left + tile + right) / 2
        bounds.append(int(round(middle / ALIGN)) * ALIGN)
    bounds.append(length)
    return list(zip(bounds[:-1], bounds[1:]))


class TiledExtractor:
    """A :class:`~core.backbones.FeatureExtractor` that runs inputs larger than ``tile`` in tiles.

    Everything else (``spec``, ``weights_identity``, ``network``, ...) is the
    wrapped extractor's, so model identities are unchanged.
    """

    def __init__(self, base: FeatureExtractor, tile: int, overlap: int = 64) -> None:
        if tile % ALIGN or tile <= 0:
            raise ValueError(f"tile must be a positive multiple of {ALIGN} pixels, got {tile}")
        if overlap < 0 or overlap >= tile:
            raise ValueError(f"overlap must be in [0, tile), got {overlap}")
        self.base = base
        self.tile = tile
        self.overlap = overlap

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, stages: Iterable[str] = ()) -> Features:
        """(B, 3, H, W) in [0, 1] -> Features with maps {stage: (B, C, ceil(H/s), ceil(W/s))}, pooled (B, D).

        The pooled vector is the area-weighted mean of the tiles' pooled vectors.
        """
        stages = tuple(stages)
        height, width = images.shape[-2:]
        if max(height, width) <= self.tile:
            return self.base(images, stages)
        if height % ALIGN or width % ALIGN:
            raise ValueError(f"a tiled input must be a multiple of {ALIGN} pixels per side, got {height}x{width}")
        rows = tile_starts(height, self.tile, self.overlap)
        cols = tile_starts(width, self.tile, self.overlap)
        row_keep, col_keep = _seams(rows, self.tile, height), _seams(cols, self.tile, width)
        maps: dict[str, torch.Tensor] = {}
        pooled_sum: torch.Tensor | None = None
        area = 0
        for top, (keep_top, keep_bottom) in zip(rows, row_keep):
            for left, (keep_left, keep_right) in zip(cols, col_keep):
                tile_h, tile_w = min(self.tile, height), min(self.tile, width)
                out = self.base(images[..., top : top + tile_h, left : left + tile_w], stages)
                weight = (keep_bottom - keep_top) * (keep_right - keep_left)
                part = out.pooled.float() * weight
                pooled_sum = part if pooled_sum is None else pooled_sum + part
                area += weight
                for stage in stages:
                    value = out.maps[stage]
                    stride = self.spec.stage(stage).stride
                    if stage not in maps:
                        shape = (value.shape[0], value.shape[1], math.ceil(height / stride), math.ceil(width / stride))
                        maps[stage] = value.new_empty(shape)
                    y0, y1 = keep_top // stride, math.ceil(keep_bottom / stride)
                    x0, x1 = keep_left // stride, math.ceil(keep_right / stride)
                    maps[stage][..., y0:y1, x0:x1] = value[..., y0 - top // stride : y1 - top // stride,
                                                           x0 - left // stride : x1 - left // stride]
        assert pooled_sum is not None
        return Features(maps=maps, pooled=pooled_sum / area)

    def extract(self, batches, stages=(), pool_stages: bool = False, map_dtype: torch.dtype = torch.float32) -> Features:
        """As :meth:`FeatureExtractor.extract`, through the tiled forward pass."""
        return FeatureExtractor.extract(self, batches, stages, pool_stages, map_dtype)  # type: ignore[arg-type]
