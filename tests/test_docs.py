"""The documentation: the README stays a short user's page, and every link resolves inside the repository."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
SKIP_DIRS = {".git", ".venv", "data", "node_modules"}
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def lines(path: Path, keep_code: bool = False) -> list[str]:
    """The page's lines outside fenced code blocks; inline code removed unless ``keep_code``."""
    out, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if re.match(r"^\s*(```|~~~)", line):
            fenced = not fenced
        elif not fenced:
            out.append(line if keep_code else re.sub(r"`[^`]*`", "", line))
    return out


def links(path: Path) -> list[str]:
    """Link targets other than URLs (http:, https:, mailto:, ...)."""
    targets = [t for line in lines(path) for t in LINK.findall(line)]
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lowercase, punctuation but '-' and '_' dropped, spaces to '-'; repeats get -1, -2."""
    found, counts = set(), {}
    for line in lines(path, keep_code=True):
        if m := HEADING.match(line):
            s = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
            n = counts[s] = counts.get(s, -1) + 1
            found.add(f"{s}-{n}" if n else s)
    return found


def broken(page: Path, root: Path = ROOT) -> list[str]:
    problems = []
    for target in links(page):
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.is_relative_to(root):
            problems.append(f"{page}: {target} points outside the repository")
        elif not dest.exists():
            problems.append(f"{page}: {target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{page}: {target}: no heading #{anchor} in {dest.name}")
    return problems


def test_readme_is_a_short_page():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= 250, f"README.md has {n} lines (at most 250): reference material belongs in docs/"


def test_every_relative_link_resolves():
    problems = [p for page in PAGES for p in broken(page)]
    assert not problems, "\n".join(problems)


def test_no_markdown_file_links_outside_the_repository():
    outside = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        for page in (Path(folder) / f for f in files if f.endswith(".md")):
            outside += [f"{page}: {t}" for t in links(page)
                        if not (page.parent / t.partition("#")[0]).resolve().is_relative_to(ROOT)]
    assert not outside, "links outside the repository:\n" + "\n".join(outside)


def test_the_link_check_catches_what_it_should(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n## Two `words`, here\n```\n# not a heading\n```\n")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/a.md#two-words-here) [no file](docs/b.md) [no heading](docs/a.md#not-a-heading)\n"
                    "[out](../x.md) [web](https://example.com) `[code](nowhere.md)`\n")
    assert len(broken(page, root=tmp_path)) == 3
