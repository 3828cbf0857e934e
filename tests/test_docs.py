"""The docs site builds and the README stays a front page (issue 25).

`mkdocs build --strict` fails on a broken link or anchor and on a page left out of `nav`
(mkdocs.yml's `validation` turns those into warnings, --strict into errors). The nav and
README checks below are done here as well, since they are cheap and name the page or
link that is wrong instead of pointing at a build log."""

import os
import re
import subprocess
import sys

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

README_MAX_LINES = 250


def _nav_pages(nav) -> set[str]:
    """Every page file `nav` names, however deeply its sections nest."""
    if isinstance(nav, str):
        return {nav}
    if isinstance(nav, list):
        return set().union(*(_nav_pages(item) for item in nav))
    if isinstance(nav, dict):
        return set().union(*(_nav_pages(value) for value in nav.values()))
    return set()


def test_the_docs_site_builds_strictly(tmp_path):
    # Material prints a banner about MkDocs 2 on every build unless told not to.
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr + done.stdout
    assert (tmp_path / "index.html").is_file()


def test_every_docs_page_is_in_the_nav():
    # mkdocs.yml uses plain YAML only (no !!python tags), so safe_load reads it.
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    assert config["docs_dir"] == "docs"
    pages = {path.name for path in (REPO / "docs").glob("*.md")}
    in_nav = _nav_pages(config["nav"])
    assert pages - in_nav == set(), f"pages missing from mkdocs.yml's nav: {sorted(pages - in_nav)}"
    assert in_nav - pages == set(), f"nav names pages that do not exist: {sorted(in_nav - pages)}"


def test_the_readme_is_short_and_its_links_into_docs_resolve():
    readme = (REPO / "README.md").read_text()
    lines = readme.count("\n") + (not readme.endswith("\n"))
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/ (at most {README_MAX_LINES})"
    # The set-up a new user reads: exactly these two commands.
    assert re.findall(r"^make \w+", readme, flags=re.M) == ["make demo", "make test"]
    targets = re.findall(r"\]\((docs/[^)#\s]+)(?:#[^)\s]*)?\)", readme)
    assert targets, "README.md links into docs/"
    missing = sorted({target for target in targets if not (REPO / target).is_file()})
    assert missing == [], f"README.md links to files that do not exist: {missing}"
