"""The evaluation report: Markdown (``report.md``, PNGs linked relatively) and self-contained HTML
(``report.html``, the same content rendered by markdown-it with the PNGs embedded as base64).
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

SECTIONS = (
    "Summary",
    "Classification",
    "Calibration",
    "Detection",
    "Segmentation",
    "Complexity",
    "Effective receptive field",
    "Grad-CAM",
    "Training curves",
    "Environment and provenance",
)
DEMO_NOTE = "n/a (demo data)"


def published_results() -> dict:
    """The published tables shipped in ``overlock/reference/published_results.json``."""
    return json.loads(resources.files("overlock").joinpath("reference/published_results.json").read_text())


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell: floats rounded, None/NaN as an em dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value).replace("|", "\\|")


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


class Report:
    """Sections of Markdown blocks in a fixed order; ``write`` renders report.md and report.html."""

    def __init__(self, title: str):
        self.title = title
        self.sections: dict[str, list[str]] = {name: [] for name in SECTIONS}

    def add(self, section: str, *blocks: str) -> None:
        if section not in self.sections:
            raise KeyError(f"unknown report section {section!r}; valid: {', '.join(SECTIONS)}")
        self.sections[section].extend(b for b in blocks if b)

    def image(self, section: str, path: Path | None, caption: str) -> None:
        """Add a figure (a PNG in the report directory, linked by its file name)."""
        if path is not None:
            self.add(section, f"![{caption}]({Path(path).name})\n\n*{caption}*")

    def markdown(self) -> str:
        parts = [
            f"# {self.title}",
            "",
            "Contents: "
            + " · ".join(
                f"[{name}](#{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')})" for name in SECTIONS
            ),
            "",
        ]
        for name, blocks in self.sections.items():
            parts += [f"## {name}", ""]
            parts += [*(b + "\n" for b in blocks)] if blocks else ["(nothing to report)\n"]
        return "\n".join(parts)

    def write(self, out_dir: Path) -> tuple[Path, Path]:
        """Write ``report.md`` and ``report.html`` into ``out_dir``; return both paths."""
        out_dir = Path(out_dir)
        md = self.markdown()
        md_path = out_dir / "report.md"
        md_path.write_text(md)
        html_path = out_dir / "report.html"
        html_path.write_text(render_html(md, self.title, out_dir))
        return md_path, html_path


def _embed_images(body: str, image_dir: Path) -> str:
    def repl(match: re.Match) -> str:
        path = image_dir / html.unescape(match.group(1))
        if path.suffix.lower() != ".png" or not path.exists():
            return match.group(0)
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f'src="data:image/png;base64,{data}"'

    return re.sub(r'src="([^"]+)"', repl, body)


def _anchor_headings(body: str) -> str:
    def repl(match: re.Match) -> str:
        text = match.group(2)
        slug = re.sub(r"[^a-z0-9]+", "-", html.unescape(text).lower()).strip("-")
        return f'<h{match.group(1)} id="{slug}">{text}</h{match.group(1)}>'

    return re.sub(r"<h([12])>(.*?)</h\1>", repl, body)


STYLE = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #ccc;padding:.25em .6em;
text-align:right}th{background:#f0f3f7}td:first-child,th:first-child{text-align:left}img{max-width:100%;
border:1px solid #ddd;margin:.4em 0}h2{border-bottom:2px solid #4c72b0;padding-bottom:.2em;margin-top:1.8em}
code,pre{background:#f6f8fa}pre{padding:.6em;overflow-x:auto}"""


def render_html(markdown_text: str, title: str, image_dir: Path) -> str:
    """Self-contained HTML of the Markdown report (tables enabled, PNGs inlined as base64)."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown_text)
    body = _anchor_headings(_embed_images(body, image_dir))
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>\n{body}</body></html>\n"
    )
