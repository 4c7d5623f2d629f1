"""Griffe extension for the API reference: render Sphinx roles as code.

The docstrings of editor_reid use reStructuredText habits (``:func:`select_tokens```,
``:class:`EDITOR```). Markdown has no roles, so without this the role name would be printed
in front of the code span. Double backticks need nothing: Markdown reads them as code too.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|obj|exc|const):`~?\.?([^`]+)`")


class SphinxRolesAsCode(griffe.Extension):
    """Replace ``:role:`target``` by ```target``` in every docstring."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and ":" in obj.docstring.value:
            obj.docstring.value = _ROLE.sub(r"`\1`", obj.docstring.value)
