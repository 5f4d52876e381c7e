"""Shared fixtures: a throw-away workspace and a few small synthetic images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_BOTTLE = REPO_ROOT / "assets" / "demo" / "bottle"


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def workspace_dir(tmp_path, monkeypatch) -> Path:
    """An empty workspace folder, also exported as ANOMALY_WORKSPACE for code that reads the default."""
    folder = tmp_path / "workspace"
    monkeypatch.setenv("ANOMALY_WORKSPACE", str(folder))
    return folder


@pytest.fixture
def noise_pngs() -> list[tuple[str, bytes]]:
    """Five distinct 32x32 RGB noise images as (name, PNG bytes)."""
    rng = np.random.default_rng(0)
    return [(f"noise_{i}.png", png_bytes(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))) for i in range(5)]
