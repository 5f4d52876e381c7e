"""Draw where the defect is: brush, rectangle or polygon over a test image, saved as its mask.

The editor is ``streamlit-drawable-canvas`` (Fabric.js); its toolbar holds
undo, redo and "reset" (clear). The canvas shows the image shrunk to fit
``CANVAS_SIDE`` with its aspect kept; ``core.projects.regions`` redraws the
shapes at the image's own resolution when the user saves. A saved drawing
comes back on the canvas to be edited (its shapes are kept in the store).
"""

from __future__ import annotations

from typing import Any

import streamlit as st
from PIL import Image

from core.images import ImageError
from core.projects import regions
from core.store import StoredImage, Workspace
from dashboard import state

CANVAS_SIDE = 420  # the canvas's longer side in screen pixels
TOOLS = {"Brush": "freedraw", "Rectangle": "rect", "Polygon": "polygon"}
TOOL_HELP = ("Brush: paint over the defect. Rectangle: drag a box. Polygon: click the corners, then click the first "
             "one again to close it. The toolbar above the image undoes, redoes and clears; its pencil switches to "
             "moving and resizing shapes already drawn.")
FILL = "rgba(255, 40, 40, 0.35)"
STROKE = "#ff2828"


def canvas_size(image: StoredImage, side: int = CANVAS_SIDE) -> tuple[int, int]:
    """(width, height) of the canvas: the image's aspect, its longer side ``side`` screen pixels."""
    scale = side / max(image.width, image.height)
    return max(1, round(image.width * scale)), max(1, round(image.height * scale))


def _shown_drawing(drawing: dict[str, Any] | None, size: tuple[int, int]) -> dict[str, Any] | None:
    """A saved drawing as the canvas's initial content (None: nothing saved, or saved on a canvas of another size,
    whose coordinates would not fit this one)."""
    if not drawing or tuple(drawing.get("canvas", ())) != size:
        return None
    return {"version": drawing.get("version", "7.4.0"), "objects": drawing.get("objects", [])}


def region_editor(workspace: Workspace, image: StoredImage) -> None:
    """The drawing canvas over ``image`` (a test image), its tools, and Save / Remove buttons."""
    from streamlit_drawable_canvas import st_canvas  # registers its component: only where a canvas is drawn

    saved = workspace.region(image.id)
    size = canvas_size(image)
    tools = st.columns([3, 2])
    tool = tools[0].segmented_control("Tool", list(TOOLS), default="Brush", key=state.REGION_TOOL_WIDGET,
                                      help=TOOL_HELP) or "Brush"
    width = tools[1].slider("Brush width", 2, 40, 12, key=state.REGION_WIDTH_WIDGET, disabled=tool != "Brush")
    try:
        background = Image.fromarray(state.region_background(str(image.path), *size))
    except (ImageError, OSError) as error:
        st.error(f"{image.name}: {getattr(error, 'reason', error)}")
        return
    result = st_canvas(fill_color=FILL, stroke_width=width, stroke_color=STROKE, background_image=background,
                       width=size[0], height=size[1], drawing_mode=TOOLS[tool],
                       initial_drawing=_shown_drawing(saved.drawing if saved else None, size),
                       key=state.region_canvas_widget(image.id, saved.updated if saved else 0.0))
    objects = (result.json_data or {}).get("objects") if result is not None else None
    drawn = objects if objects is not None else (saved.drawing.get("objects", []) if saved else [])
    buttons = st.columns([1, 1, 2])
    if buttons[0].button("Save region", icon=":material/save:", type="primary", key=f"region-save-{image.id}",
                         disabled=not drawn and saved is None):
        try:
            stored = regions.mark_region(workspace, image.id, {"canvas": list(size), "objects": drawn,
                                                               "version": (result.json_data or {}).get("version")})
        except (regions.DrawingError, ValueError) as error:
            st.error(f"{image.name}: the region was not saved: {error}")
            return
        state.flash("success", f"{image.name}: region saved; the image is marked anomalous."
                    if stored.mask_path is not None and drawn else f"{image.name}: the drawn region was removed.")
        st.rerun()
    if saved is not None and buttons[1].button("Remove region", icon=":material/delete:", key=f"region-remove-{image.id}"):
        regions.unmark_region(workspace, image.id)
        state.flash("info", f"{image.name}: the drawn region was removed; its label is what it was before.")
        st.rerun()
    unsaved = objects is not None and saved is not None and objects != saved.drawing.get("objects", [])
    buttons[2].caption(
        ("Unsaved changes. " if unsaved or (objects and saved is None) else "")
        + (f"Saved: {len(saved.drawing.get('objects', []))} shape(s), the image's mask (shown as the ground truth "
           "on Segment)." if saved else "Nothing saved yet. Saving marks the image anomalous."))
