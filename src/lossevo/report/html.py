"""The report as one self-contained HTML page: report.md rendered, every figure embedded.

markdown-it-py renders the Markdown (CommonMark plus GFM tables); each linked PNG is inlined as a
``data:`` URI so the page can be mailed or archived as a single file.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from lossevo.io import write_text

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem;
       line-height: 1.45; color: #222; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
img { max-width: 100%; }
code { background: #f5f5f5; padding: 0 0.2rem; }
"""


def render(markdown_text: str, base: Path, title: str) -> str:
    """HTML for ``markdown_text``; images are read relative to ``base`` and embedded."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(markdown_text)

    def inline(match: re.Match) -> str:
        src = html.unescape(match.group(1))
        path = base / src
        if "://" in src or not path.is_file():
            return match.group(0)
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f'src="data:image/png;base64,{data}"'

    body = re.sub(r'src="([^"]+\.png)"', inline, body)
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}"
            f"</body>\n</html>\n")


def write(markdown_path: Path, title: str) -> Path:
    """Write ``report.html`` beside ``report.md``."""
    markdown_path = Path(markdown_path)
    out = markdown_path.with_suffix(".html")
    return write_text(out, render(markdown_path.read_text(), markdown_path.parent, title))
