"""Entry point: ``streamlit run dashboard/app.py`` from the repository root."""

import sys
from pathlib import Path

# `streamlit run` puts only this file's folder on sys.path; the pages import `core` and `dashboard`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import streamlit as st  # noqa: E402

from dashboard import state  # noqa: E402

st.set_page_config(page_title="Anomaly detection with pretrained features", page_icon=":material/search:", layout="wide")
try:
    state.apply_thread_setting()  # ANOMALY_THREADS: 1 on a machine other work shares (see core.threads)
except ValueError as error:
    st.error(str(error))
    st.stop()
st.navigation(
    [
        st.Page("views/start.py", title="Start", icon=":material/rocket_launch:", default=True),
        st.Page("views/data.py", title="Data", icon=":material/folder_open:"),
        st.Page("views/detect.py", title="Detect", icon=":material/analytics:"),
        st.Page("views/adapt.py", title="Adapt (PANDA)", icon=":material/model_training:"),
        st.Page("views/segment.py", title="Segment", icon=":material/blur_on:"),
        st.Page("views/review.py", title="Review", icon=":material/fact_check:"),
    ]
).run()
