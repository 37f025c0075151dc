"""Every section the project cites (the architecture document's or README's, by quoted title) exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CITATION = re.compile(r'(docs/ARCHITECTURE\.md|README) "([^"]+)"')


def _headings(path: Path) -> set[str]:
    return {re.sub(r"\s*\(`[^`]*`\)$", "", line.lstrip("#").strip()) for line in path.read_text().splitlines() if line.startswith("#")}


def test_cited_sections_exist():
    documents = {"docs/ARCHITECTURE.md": _headings(REPO / "docs" / "ARCHITECTURE.md"), "README": _headings(REPO / "README.md")}
    cited = []
    sources = [*REPO.glob("*.toml"), *REPO.glob("*.md"), *(REPO / "docs").glob("*.md"), *REPO.glob("[!.]*/**/*.py"), *REPO.glob("configs/*.yaml")]
    for path in (p for p in sources if p != Path(__file__).resolve()):
        text = " ".join(path.read_text(encoding="utf-8").split())  # a citation may wrap across lines
        for document, section in CITATION.findall(text):
            cited.append((path.relative_to(REPO), document, section))
            assert any(heading.startswith(section) for heading in documents[document]), f"{path}: {document} has no section {section!r}"
    assert any(document == "docs/ARCHITECTURE.md" for _, document, _ in cited)
