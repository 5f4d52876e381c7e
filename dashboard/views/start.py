"""Start: what each method does, the papers' numbers, and a one-click demo."""

import plotly.graph_objects as go
import streamlit as st

from core.backbones import DEFAULT_BACKBONE
from core.config import DN2Settings, settings_for
from dashboard import state, tasks
from dashboard.components import charts
from dashboard.components.sidebar import workspace_and_project

workspace, project = workspace_and_project()

st.title("Find defects by comparing with normal images")
st.markdown(
    "Give the tool **normal** images of a product (good bottles, trousers, clean parts). It describes each image "
    "with features of a network pretrained on ImageNet and flags test images whose features lie **far from every "
    "normal one**. No defect examples are needed to learn; labelled defects only serve to measure how well it works."
)

# ---------------------------------------------------------------------- demo
st.subheader("One-click demo")
columns = st.columns(len(tasks.DEMOS))
for column, demo in zip(columns, tasks.DEMOS.values()):
    with column.container(border=True):
        st.markdown(f"**{demo.title}**")
        st.caption(demo.description)
        if st.button(f"Open the {demo.key} demo", key=f"demo-{demo.key}", type="primary", width="stretch",
                     disabled=state.any_job_running()):
            with st.spinner("Importing the demo images into your workspace…"):
                demo_project, report = tasks.import_demo(workspace, demo.key)
            state.set_project(demo_project)
            added = len(report.added)
            if not workspace.models(demo_project.id):
                # One click gives results: the first model fits while the Detect page opens. For the bottles
                # it is SPADE, whose one backbone pass gives the image scores (DN2's kNN on pooled features)
                # and the Segment page's heatmaps; the clothes have no masks, so plain DN2.
                if demo.first_model == "spade":
                    state.start_segmentation_fit(workspace, demo_project.id, DEFAULT_BACKBONE)
                else:
                    settings = settings_for(DN2Settings, backbone=DEFAULT_BACKBONE)
                    state.start_job(state.FIT, f"Fitting DN2 ({DEFAULT_BACKBONE})",
                                    lambda job, p=demo_project.id: tasks.fit_and_score(workspace, p, "dn2", settings, job),
                                    demo_project.id)
                state.flash("success", f"Demo project “{demo_project.name}” ready ({added} images added). "
                                       "The first model is being fitted; its scores appear here.")
            else:
                state.flash("info", f"Demo project “{demo_project.name}” reopened with its models.")
            st.switch_page("views/detect.py")
st.caption("Demo data: MVTec AD “bottle” subset © MVTec Software GmbH, CC BY-NC-SA 4.0 (non-commercial); "
           "Fashion-MNIST © Zalando SE, MIT licence. Details in `assets/demo/*/ATTRIBUTION.md`.")

# ---------------------------------------------------------------------- methods
st.subheader("The methods, in plain words")
methods = st.columns(2)
with methods[0]:
    st.markdown(
        "**DN2 — nearest normal neighbours.** Each image becomes one feature vector. Its anomaly score is the sum "
        "of squared distances to its *k* closest normal images (k = 2). Nothing is trained; a near-duplicate of a "
        "normal image scores close to zero.\n\n"
        "**Gaussian (Mahalanobis).** Fits one bell-shaped distribution to the normal vectors at several depths of "
        "the network and measures how many standard deviations away a test image lies, taking correlations into "
        "account. Because the distribution is explicit, a threshold can be chosen for a target false-positive rate."
    )
with methods[1]:
    st.markdown(
        "**PANDA — adapt the features.** Fine-tunes the last layers so normal images cluster tightly around their "
        "centre. Trained too long, *everything* collapses onto the centre and anomalies are no longer told apart; "
        "PANDA stops early (fixed, or per-sample *SES*), or penalises changes to weights that mattered for ImageNet "
        "(*EWC*). With outlier images at hand, *PANDA-OE* also pushes those away.\n\n"
        "**SPADE — where is the defect?** The same nearest-neighbour idea per pixel: every location of a test image "
        "is compared with the same location's features in the closest normal images, giving a heatmap."
    )

# ---------------------------------------------------------------------- numbers from the papers
st.subheader("What the papers report")
st.caption("Numbers quoted from Reiss et al., “PANDA: Adapting Pretrained Features for Anomaly Detection and "
           "Segmentation”, CVPR 2021 (Tables 2–4), and Rippel et al., “Modeling the Distribution of Normal Data in "
           "Pre-Trained Deep Features for Anomaly Detection”, ICPR 2020 (Table V). ROC AUC in %; 50 = chance.")
# (title, {method: ROC AUC %}, methods of this project): quoted from the tables named in each title.
PAPER_FIGURES = [
    ("CIFAR-10, one class normal (PANDA Tab. 2)",
     {"OC-SVM": 64.7, "DeepSVDD": 64.8, "MHRot": 90.1, "DN2": 92.5, "PANDA": 96.2, "PANDA-OE": 98.9},
     {"DN2", "PANDA", "PANDA-OE"}),
    ("MVTec AD, pixel-level (PANDA Tab. 4)",
     {"AE-SSIM": 87, "AE-L2": 82, "AnoGAN": 74, "CNN Dict": 78, "SPADE": 96.2}, {"SPADE"}),
    ("MVTec AD, image-level (Rippel Tab. V)",
     {"GANomaly": 76.1, "ITAE": 83.9, "SPADE": 85.5, "OC-SVM B4": 78.1, "Gaussian B4": 95.8}, {"Gaussian B4"}),
]


def bar_chart(title: str, values: dict[str, float], ours: set[str]) -> go.Figure:
    colours = ["#2563eb" if name in ours else "#94a3b8" for name in values]
    figure = go.Figure(go.Bar(x=list(values), y=list(values.values()), marker_color=colours,
                              text=[f"{v:g}" for v in values.values()], textposition="outside"))
    figure.update_layout(title=dict(text=title, font=dict(size=14)), height=300, margin=dict(l=10, r=10, t=40, b=10),
                         yaxis=dict(range=[0, 110], title="ROC AUC %"))
    return figure


for index, (column, (title, values, ours)) in enumerate(zip(st.columns(len(PAPER_FIGURES)), PAPER_FIGURES)):
    column.plotly_chart(bar_chart(title, values, ours), key=f"paper-figure-{index}", config=charts.STATIC)
st.caption("Fashion-MNIST (PANDA Tab. 2): DN2 94.5, PANDA 95.6. In PANDA's Fig. 3, normal and anomalous test "
           "images both move towards the centre during training; the anomalies' *normalised* distance first grows, "
           "then collapses — the Adapt page draws the same curves for your data.")

st.divider()
st.markdown("**Next steps:** bring your own images on **Data** → fit on **Detect** → look at heatmaps on "
            "**Segment** → go through flagged images on **Review**.")
