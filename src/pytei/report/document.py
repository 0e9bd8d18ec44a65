"""The report document: a list of blocks rendered to Markdown and to a self-contained HTML page."""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

__all__ = ["MAX_FIGURE_PX", "Doc"]

#: Widest figure in pixels: the HTML page's content width, so no figure is ever shown shrunk.
MAX_FIGURE_PX = 1400

_CSS = (
    f"body{{font-family:system-ui,sans-serif;max-width:{MAX_FIGURE_PX}px;margin:2em auto;padding:0 1em;"
    "color:#222}"
    "h1,h2{border-bottom:1px solid #ddd;padding-bottom:.2em}"
    "table{border-collapse:collapse;font-size:.85em;margin:.5em 0 1.5em}"
    "th,td{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#f3f3f3}"
    "td:first-child,th:first-child{text-align:left}"
    "figure{margin:1em 0;overflow-x:auto}img{display:block}figcaption,.note{color:#555;font-style:italic}"
    "details{margin-bottom:1.5em}summary{cursor:pointer;font-weight:600}"
)


@dataclass(frozen=True)
class _Block:
    kind: str  # heading | text | note | table | image
    text: str = ""
    level: int = 0
    frame: pd.DataFrame | None = None
    path: Path | None = None


@dataclass
class Doc:
    """The report as a list of blocks, rendered to Markdown and to HTML from the same content."""

    out: Path
    blocks: list[_Block] = field(default_factory=list)

    def heading(self, level: int, text: str) -> None:
        self.blocks.append(_Block("heading", text, level=level))

    def text(self, text: str) -> None:
        self.blocks.append(_Block("text", text))

    def note(self, text: str) -> None:
        self.blocks.append(_Block("note", text))

    def table(self, frame: pd.DataFrame, caption: str) -> None:
        self.blocks.append(_Block("table", caption, frame=frame))

    def figure_path(self, stem: str) -> Path:
        """A fresh PNG path in the output folder (a counter keeps names unique)."""
        taken = {b.path.name for b in self.blocks if b.path is not None}
        name, k = f"{stem}.png", 1
        while name in taken:
            k += 1
            name = f"{stem}-{k}.png"
        return self.out / name

    def image(self, path: Path, caption: str) -> None:
        self.blocks.append(_Block("image", caption, path=path))

    def markdown(self) -> str:
        parts = []
        for b in self.blocks:
            if b.kind == "heading":
                parts.append("#" * b.level + " " + b.text)
            elif b.kind == "text":
                parts.append(b.text)
            elif b.kind == "note":
                parts.append(f"_{b.text}_")
            elif b.kind == "image" and b.path is not None:
                parts.append(f"![{b.text}]({b.path.name})\n\n*{b.text}*")
            elif b.frame is not None:
                parts.append(f"**{b.text}**\n\n{_md_table(b.frame)}")
        return "\n\n".join(parts) + "\n"

    def html(self, title: str) -> str:
        parts = []
        for b in self.blocks:
            if b.kind == "heading":
                parts.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
            elif b.kind == "text":
                parts.append(f"<p>{html.escape(b.text)}</p>")
            elif b.kind == "note":
                parts.append(f'<p class="note">{html.escape(b.text)}</p>')
            elif b.kind == "image" and b.path is not None:
                data = base64.b64encode(b.path.read_bytes()).decode("ascii")
                parts.append(
                    f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(b.text)}">'
                    f"<figcaption>{html.escape(b.text)}</figcaption></figure>"
                )
            elif b.frame is not None:
                parts.append(_html_table(b.frame, b.text))
        body = "\n".join(parts)
        return (
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
        )


def _md_table(frame: pd.DataFrame) -> str:
    def row(cells: Iterable[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    lines = [row(frame.columns), "|" + "|".join("---" for _ in frame.columns) + "|"]
    lines += [row(r) for r in frame.itertuples(index=False)]
    return "\n".join(lines)


def _html_table(frame: pd.DataFrame, caption: str) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
        for r in frame.itertuples(index=False)
    )
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    summary = f"{html.escape(caption)} ({len(frame)} row{'' if len(frame) == 1 else 's'})"
    return f"<details{' open' if len(frame) <= 40 else ''}><summary>{summary}</summary>{table}</details>"
