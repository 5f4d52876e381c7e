"""Entry point: ``streamlit run dashboard/app.py`` from the repository root."""

import sys
from pathlib import Path

# `streamlit run` puts only this file's folder on sys.path; the pages import `core` and `dashboard`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import streamlit as st  # noqa: E402

st.set_page_config(page_title="Anomaly detection with pretrained features", page_icon="🔍", layout="wide")
st.navigation(
    [
        st.Page("views/start.py", title="Start", icon="🏁", default=True),
        st.Page("views/data.py", title="Data", icon="🗂️"),
        st.Page("views/detect.py", title="Detect", icon="📊"),
        st.Page("views/adapt.py", title="Adapt (PANDA)", icon="🎯"),
        st.Page("views/segment.py", title="Segment", icon="🔥"),
        st.Page("views/review.py", title="Review", icon="✅"),
    ]
).run()
