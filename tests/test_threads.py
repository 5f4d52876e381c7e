"""core.threads: the ANOMALY_THREADS setting and the scoped thread count."""

from __future__ import annotations

import pytest
import torch

from core.threads import THREADS_ENV, apply_threads, configured_threads, torch_threads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("value, expected", [(None, None), ("", None), (" 3 ", 3), ("1", 1)])
def test_the_variable_gives_a_count_or_leaves_torch_alone(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv(THREADS_ENV, raising=False)
    else:
        monkeypatch.setenv(THREADS_ENV, value)
    assert configured_threads() == expected


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_a_bad_count_is_refused_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv(THREADS_ENV, value)
    with pytest.raises(ValueError, match=f"{THREADS_ENV}={value!r}"):
        configured_threads()


def test_apply_prefers_the_argument_then_the_variable(monkeypatch, restore_threads):
    monkeypatch.setenv(THREADS_ENV, "1")
    apply_threads(2)
    assert torch.get_num_threads() == 2
    apply_threads()
    assert torch.get_num_threads() == 1


def test_the_scoped_count_is_restored_even_after_an_error(restore_threads):
    torch.set_num_threads(2)
    with pytest.raises(RuntimeError):
        with torch_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("inside")
    assert torch.get_num_threads() == 2
    with torch_threads(8):  # never more than before
        assert torch.get_num_threads() == 2
