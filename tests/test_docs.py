"""The front page and the manual: every relative link resolves (file and heading), the README's test command is
CI's, and no file of the project packs runs into time slots of a remote GPU."""
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted([REPO / "README.md", REPO / "RESULTS.md", *(REPO / "docs").glob("*.md"), REPO / "configs" / "README.md",
               REPO / "scripts" / "README.md", REPO / "results" / "fmnist_repro" / "README.md",
               REPO / "kernels" / "README.md", REPO / "BENCHMARKS.md", REPO / "results" / "short_path_h200" / "README.md"])
# [text](target) and ![alt](target), outside code spans
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading):
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def _links(path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return [target for target in LINK.findall(text) if not re.match(r"[a-z]+:", target)]


def test_the_manual_is_there():
    names = {p.name for p in (REPO / "docs").glob("*.md")}
    assert {"op.md", "training.md", "segmentation.md", "analyses.md", "benchmarks.md", "reproduction.md"} <= names
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert all(f"docs/{name}" in readme for name in names)


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(REPO)) for p in DOCS])
def test_relative_links_resolve(path):
    links = _links(path)
    broken = []
    for target in links:
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(target)
    assert broken == [], f"{path.relative_to(REPO)}: {broken}"


def test_readme_test_command_is_ci():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    command = re.search(r"^(python -m pytest .*?)( \|\|.*)?$", ci, flags=re.M).group(1)
    assert f"\n{command}\n" in readme and readme.count(command) >= 2  # the set-up line and the Testing section
    assert "ruff check ." in ci
    # the first set-up command runs as a user (through sudo) and as root (no sudo in a container)
    setup = next(line for line in readme.splitlines() if "apt-get install" in line)
    assert setup.startswith("$(command -v sudo) apt-get update && $(command -v sudo) apt-get install -y ")
    assert setup.endswith("python train.py")


def test_no_file_schedules_device_time():
    """The reproduction runs on a workstation or a cluster; no file of the project packs runs into time slots."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    pattern = re.compile(r"--budget-s|reproduce_fmnist|device[ -]call|\$OUT\b|budget_s")
    others = ("tests/test_docs.py",)
    hits = [f for f in files if not f.startswith(others) and (REPO / f).is_file()
            and f.endswith((".py", ".md", ".yaml", ".sh", ".json", ".log", ".txt"))
            and pattern.search((REPO / f).read_text(errors="replace"))]
    assert hits == []
