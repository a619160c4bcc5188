"""Sections of benchmarks/RESULTS.md written by stand-alone scripts, between HTML-comment markers."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(name: str, text: str, path: Path = RESULTS) -> None:
    """Replace the ``<!-- name:begin -->`` … ``<!-- name:end -->`` part of ``path`` with ``text``
    (which must carry the markers, see :func:`markers`), or append it."""
    begin, end = markers(name)
    page = path.read_text() if path.is_file() else "# belm benchmarks\n"
    if begin in page and end in page:
        head, rest = page.split(begin, 1)
        page = head + text + rest.split(end, 1)[1]
    else:
        page = page.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(page)


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def marked_sections(page: str) -> list[str]:
    """Every ``<!-- name:begin -->`` … ``<!-- name:end -->`` part of ``page``, markers included."""
    import re
    return [m.group(0) for m in re.finditer(r"<!-- ([\w-]+):begin -->.*?<!-- \1:end -->", page, flags=re.S)]
