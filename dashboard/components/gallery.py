"""Thumbnail grids: every thumbnail the same size, so a page of them lines up on a laptop screen."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import streamlit as st

from core.images import ImageError
from core.store import StoredImage
from dashboard import state

THUMB_SIDE = 160


def gallery(
    images: Sequence[StoredImage],
    caption: Callable[[StoredImage], str] = lambda image: image.name,
    columns: int = 6,
    selectable_key: str | None = None,
) -> list[int]:
    """Show ``images`` in a grid; with ``selectable_key``, a checkbox under each.

    Returns the ids of the ticked images (empty without ``selectable_key``).
    An image that cannot be decoded shows an error naming the file instead of
    breaking the page.
    """
    ticked: list[int] = []
    for start in range(0, len(images), columns):
        row = st.columns(columns)
        for column, image in zip(row, images[start : start + columns]):
            with column:
                try:
                    st.image(state.thumbnail(str(image.path), THUMB_SIDE), caption=caption(image), width=THUMB_SIDE)
                except (ImageError, OSError) as error:
                    st.error(f"{image.name}: {getattr(error, 'reason', error)}")
                if selectable_key is not None and st.checkbox(
                    "select", key=f"{selectable_key}-{image.id}", label_visibility="collapsed"
                ):
                    ticked.append(image.id)
    return ticked


def paged(items: Sequence, page_size: int, key: str) -> Sequence:
    """The slice of ``items`` on the page the user picked (a page picker appears when needed)."""
    pages = max(1, -(-len(items) // page_size))
    if pages == 1:
        return items
    page = st.columns([1, 5])[0].number_input(f"Page (of {pages})", 1, pages, 1, key=key)
    return items[(page - 1) * page_size : page * page_size]
