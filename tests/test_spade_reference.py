"""SPADE still computes what it computed before its parts were carved out of one class.

The reference (``tests/data/spade_reference.npz``) is written by ``python -m tests.spade_reference`` with the
code before a carve: first with the detector as one class, last at commit 103299b, before the model file and
the image threshold's evidence moved out (``model_file``, ``working_point``). On the machine that wrote it the
carved detector reproduces every array bit for bit (``np.array_equal``). Another CPU may round float32 sums differently in the last bits, hence the tolerance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.spade_reference import compute

REFERENCE = Path(__file__).parent / "data" / "spade_reference.npz"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_spade_outputs_equal_the_reference():
    reference = np.load(REFERENCE)
    now = compute()
    assert sorted(now) == sorted(reference.files)
    for key in reference.files:
        np.testing.assert_allclose(now[key], reference[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for case in {key.split("/")[0] for key in now}:
        # A saved and reloaded model draws the same heatmaps and scores as the fitted one.
        np.testing.assert_array_equal(now[f"{case}/loaded_heat"], now[f"{case}/heat"])
        np.testing.assert_array_equal(now[f"{case}/loaded_score"], now[f"{case}/score"])
