"""dashboard.state: per-session values that outlive one page run."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest


def _page_with_an_action() -> None:
    import streamlit as st

    from dashboard import state

    if st.button("Act", key="act"):
        state.flash("success", "region saved")
    for kind, text in state.take_flashes():
        getattr(st, kind)(text)


def test_a_flash_survives_the_rerun_that_follows_an_action_then_goes(monkeypatch):
    from dashboard import state

    at = AppTest.from_function(_page_with_an_action).run()
    at.button(key="act").click().run()
    assert [m.value for m in at.success] == ["region saved"]
    at.run()  # a component's automatic rerun right after the action
    assert [m.value for m in at.success] == ["region saved"]
    monkeypatch.setattr(state, "FLASH_SECONDS", 0.0)  # its time has passed
    at.run()
    assert not at.success and at.session_state[state.FLASH] == []


def test_the_thread_setting_is_applied_once_per_server_not_on_every_page_run(monkeypatch):
    """A page run must not undo a running job's own count (the lesson computes with one thread)."""
    import torch

    from core.threads import THREADS_ENV
    from dashboard import state

    before = torch.get_num_threads()
    monkeypatch.setenv(THREADS_ENV, "2")
    state.apply_thread_setting.clear()
    try:
        state.apply_thread_setting()
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)  # a job's own count, meanwhile
        state.apply_thread_setting()  # the next page run
        assert torch.get_num_threads() == 1
    finally:
        state.apply_thread_setting.clear()
        torch.set_num_threads(before)
