"""Streamlit dashboard: a thin view over ``core`` (run ``streamlit run dashboard/app.py``)."""
