"""The dataset layouts cxr reads, one module each, and their registry.

A layout is a :class:`Layout`: its name and title, how it is told from a folder or a table,
how it is read into :class:`~cxr.data.table.LabeledData` (the table of :mod:`cxr.data.schema`),
its label set, where its images are, and the facts that differ between layouts (NIH's
official lists, bounding boxes, the model card's words). Code that reads any dataset asks the
layout, ``get_layout(data.layout).official_lists``, and never compares layout names.

Each module registers its layout when imported (``LAYOUT = register(Layout(...))``). This
package imports the built-in ones below, in the order that ``--layout`` and messages list
them: adding a layout to cxr is one new module here and its name in that import. A layout
outside cxr (a plugin, a test) is one module that calls :func:`register`; ``read_dataset``
then reads it by name (``--layout NAME``) or, with a ``detect``, by ``--layout auto``.
"""

from cxr.data.layouts.registry import (
    DEFAULT_PRIORITY,
    Layout,
    detect_layout,
    find_images_by_path,
    get_layout,
    is_layout,
    layout_names,
    register,
    unregister,
)

# The built-in layouts, each registering itself on import (in this order).
from cxr.data.layouts import nih, chexpert, mimic, generic  # noqa: F401  isort: skip

__all__ = [
    "DEFAULT_PRIORITY",
    "Layout",
    "detect_layout",
    "find_images_by_path",
    "get_layout",
    "is_layout",
    "layout_names",
    "register",
    "unregister",
]
