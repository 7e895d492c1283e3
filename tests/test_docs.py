"""A clone is self-contained: docs, code and comments cite only what is in the repository."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = re.compile(r"\.\./shared|shared/reference|seed-00\d")


def test_no_reference_to_files_outside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not files:  # not a git checkout (e.g. an sdist): walk the tree instead
        files = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file() and ".venv" not in p.parts]
    hits = []
    for name in files:
        path = ROOT / name
        if path.suffix not in {".py", ".md", ".yaml", ".yml", ".smk", ".toml", ".txt", ".cfg"} \
                and path.name not in {"Makefile", "Snakefile", "run"}:
            continue
        if not path.exists() or name == "tests/test_docs.py":
            continue
        for no, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{name}:{no}: {line.strip()[:100]}")
    assert not hits, "references outside the repository:\n" + "\n".join(hits)


def test_readme_links_resolve():
    text = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README links to missing {target}"
