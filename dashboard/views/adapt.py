import streamlit as st

from dashboard.components.sidebar import require_project, workspace_and_project

workspace, project = workspace_and_project()
project = require_project(project)
st.title("adapt")
st.info("Coming as its engine lands.")
