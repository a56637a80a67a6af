"""The documentation holds together: the README is a short front door that starts with the two commands and links
every page of docs/, every relative link of README.md and docs/*.md resolves (files moved by a refactor show up
here), and docs/configuration.md is what `make docs` generates from the config's fields today."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from data_prep import config_doc
from data_prep.config import describe_config

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """`text` without fenced code blocks and inline code, where brackets are not links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: formatting dropped, lower case, punctuation but `-` and `_` removed,
    spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[`*]", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+?)\s*#*$", re.sub(r"^```.*?^```", "", path.read_text(),
                                                               flags=re.M | re.S), re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_slug_is_githubs() -> None:
    assert slug("Speed: host memory, static shapes, unpadded batches, no host syncs") == \
        "speed-host-memory-static-shapes-unpadded-batches-no-host-syncs"
    assert slug("Mixtures of sources (weights)") == "mixtures-of-sources-weights"
    assert slug("cpu-30min: the best model 30 minutes of 2 CPU cores buy") == \
        "cpu-30min-the-best-model-30-minutes-of-2-cpu-cores-buy"
    assert slug("`data.packing` and [links](x.md)") == "datapacking-and-links"


def test_the_configuration_page_is_current() -> None:
    """docs/configuration.md equals what `make docs` would write now: a changed field help, default or range
    without `make docs` fails here."""
    current = config_doc.PAGE.read_text()
    assert config_doc.render(current) == current, "docs/configuration.md is stale: run `make docs`"
    assert config_doc.MARKER in current
    assert "| `data.seq_len` | int | `512` | in [8, 65536]" in current


def test_a_page_without_the_marker_is_refused_not_overwritten(tmp_path: Path, monkeypatch, capsys) -> None:
    page = tmp_path / "configuration.md"
    page.write_text("# The config\n\nHand-written text.\n")
    monkeypatch.setattr(config_doc, "PAGE", page)
    assert config_doc.main([]) == 2
    assert page.read_text() == "# The config\n\nHand-written text.\n"
    assert "is missing; put it where the generated tables begin" in capsys.readouterr().err
    page.unlink()
    assert config_doc.main([]) == 0 and config_doc.main(["--check"]) == 0  # a new page: a title, then the tables
    assert page.read_text().startswith(config_doc.DEFAULT_INTRO + "\n" + config_doc.MARKER)


def test_every_key_of_the_config_is_in_the_configuration_page() -> None:
    keys = [line.split(" (")[0].strip() for line in describe_config().splitlines()
            if line.startswith("  ")]
    page = config_doc.PAGE.read_text()
    assert len(keys) > 80
    assert [k for k in keys if f"| `{k}` |" not in page] == []


def test_every_docs_page_is_linked_from_the_readme() -> None:
    readme_links = {target.split("#")[0] for target in LINK.findall(prose((REPO / "README.md").read_text()))}
    pages = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))
    assert pages, "docs/ has no pages"
    assert [p for p in pages if p not in readme_links] == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_resolves(page: Path) -> None:
    """Files exist, and a `#anchor` names a heading of its target as GitHub slugifies it."""
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and (file.is_dir() or anchor not in anchors(file)):
            broken.append(f"{target} (no such heading)")
    assert broken == [], f"{page.relative_to(REPO)}: {broken}"


def test_the_readme_is_a_front_door_that_starts_with_the_two_commands() -> None:
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) < 260
    first_block = re.search(r"^```\n(.*?)^```", text, re.M | re.S)
    assert first_block is not None and first_block.group(1) == "make pretrain\nmake test\n"
    assert text.index("```") < text.index("\n## ")  # the commands come before any section
