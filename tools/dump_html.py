"""A dump document as one self-contained HTML page: pan, zoom, search, hover details, filters
and collapsible layers, drawn by the browser, so no Graphviz is needed.

    page = tools.dump_html.to_html(doc)        # str: write it anywhere, open it from file://
    tools.dump_html.HtmlDump(doc)              # in Jupyter: the same page in an iframe

``doc`` is a dump document (``graph.drawing``, ``engine.views.annotate``; one read from a file
is checked by ``graph.documents.check_dump`` first). The page embeds it as JSON that cannot end
its script element, and its script writes every value of it into markup escaped, so that a
label is only ever text. It lays the graph out in JavaScript: ranks by longest path over the
data edges, each layer a band of ranks under a labelled header (collapsing a layer re-lays-out
the rest), a leaf read by other layers drawn again in each (as ``graph.drawing.to_dot`` does),
barycenter sweeps against crossings. The URL hash sets the initial state, which is what
screenshots use: ``#collapse=all`` (or ``=3,4,in``), ``layers=2:5``, ``ops=MUL_MAT,ADD``,
``search=attn``, ``offsets=1``, ``fit=1``. The page marks ``<body data-ready="1">`` once drawn
and ``data-error`` on a script error: the tests read both from headless Chromium.

The page itself (markup, styles, script) is ``dump_page.html`` beside this module, a template
with three placeholders: ``%TITLE%``, ``%COUNT%`` and ``%DOC%``.
"""

from __future__ import annotations

import functools
import html
import json
import re
from importlib import resources
from typing import Any

from graph.documents import finite

__all__ = ["to_html", "HtmlDump"]


def to_html(doc: dict[str, Any]) -> str:
    """The page for ``doc``: ASCII only (``Path.write_text`` uses the locale's encoding), with
    the document in a ``<script type="application/json" id="dump">`` element."""
    values = {
        "TITLE": _ascii(html.escape(doc.get("title") or "graph")),
        "COUNT": str(len(doc.get("nodes", []))),
        "DOC": _json(doc),
    }
    # one pass, so that a title or label holding a placeholder is not substituted again
    return re.sub(r"%(TITLE|COUNT|DOC)%", lambda m: values[m[1]], _page())


class HtmlDump:
    """A dump document that Jupyter shows as the interactive page, in an iframe so that the
    page's script and styles stay apart from the notebook's."""

    def __init__(self, doc: dict[str, Any], height: int = 640) -> None:
        self.doc = doc
        self.height = height

    def _repr_html_(self) -> str:
        page = html.escape(to_html(self.doc), quote=True)
        style = f"width:100%;height:{self.height}px;border:1px solid #ddd"
        return f'<iframe sandbox="allow-scripts" style="{style}" srcdoc="{page}"></iframe>'


def _json(doc: dict[str, Any]) -> str:
    """JSON that cannot end its script element: ``<`` (``</script>``, ``<!--``) and friends
    are written as ``\\u`` escapes, which are only legal inside JSON strings anyway."""
    try:
        text = json.dumps(doc, separators=(",", ":"), allow_nan=False)
    except ValueError:  # NaN/inf: JSON.parse rejects them
        text = json.dumps(finite(doc), separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _ascii(text: str) -> str:
    return text.encode("ascii", "xmlcharrefreplace").decode("ascii")


@functools.cache
def _page() -> str:
    return resources.files("tools").joinpath("dump_page.html").read_text(encoding="utf-8")
