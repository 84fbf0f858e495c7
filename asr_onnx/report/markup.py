"""The only writers of markup in the HTML page: :func:`tag` from allowlists of tags and attributes, and
:func:`text`, the one place where anything from a report enters the page."""

from __future__ import annotations

import base64
import re
from html import escape

TAGS = frozenset({"html", "head", "meta", "title", "style", "body", "main", "h1", "h2", "p", "nav", "a", "section",
                  "div", "b", "span", "table", "tr", "th", "td", "img", "code"})
VOID = frozenset({"meta", "img"})
# attribute -> the pattern its whole value must match (the values are this module's, never a report's)
ATTRIBUTES = {"lang": r"en", "charset": r"utf-8", "class": r"[a-z][a-z ]*", "id": r"[a-z_]+",
              "href": r"#[a-z_]+", "style": r"width:\d+(\.\d+)?%", "src": r"data:image/svg\+xml;base64,[A-Za-z0-9+/=]*",
              "title": r"[^\x00]*", "alt": r"[^\x00]*"}


class Markup(str):
    """HTML that :func:`tag` or :func:`text` made; any other str is text, and is escaped."""


def text(value) -> Markup:
    """A value as HTML text: the one place where anything from a report enters the page."""
    return Markup(escape("" if value is None else str(value), quote=True))


def _children(children) -> str:
    parts = []
    for child in children:
        if isinstance(child, (list, tuple)):
            parts.append(_children(child))
        elif isinstance(child, Markup):
            parts.append(child)
        elif child is not None:
            parts.append(text(child))
    return "".join(parts)


def tag(name: str, *children, **attributes) -> Markup:
    """``<name attributes>children</name>``: children that are not Markup are text; ``class_`` is class.

    Raises:
        ValueError: a tag or attribute outside the allowlists, or a value that does not match its pattern
            (a bug of this module: a report never chooses tags, attributes or their patterns).
    """
    if name not in TAGS:
        raise ValueError(f"tag {name!r} is not allowed")
    written = []
    for key, value in attributes.items():
        key = key.rstrip("_")
        if value is None:
            continue
        if key not in ATTRIBUTES or not re.fullmatch(ATTRIBUTES[key], str(value)):
            raise ValueError(f"attribute {key}={str(value)[:40]!r} is not allowed")
        written.append(f' {key}="{text(value)}"')
    opening = f"<{name}{''.join(written)}>"
    if name in VOID:
        return Markup(opening)
    return Markup(f"{opening}{_children(children)}</{name}>")


def join(*parts) -> Markup:
    return Markup(_children(parts))


def figure_tag(fig, alt: str) -> Markup:
    """A matplotlib figure as an inline SVG image."""
    from asr_onnx.report.plots import svg

    data = base64.b64encode(svg(fig).encode()).decode()
    return tag("img", class_="plot", alt=alt, src=f"data:image/svg+xml;base64,{data}")
