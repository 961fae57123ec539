"""The documentation: every layer has its reference entry, the front pages stay
short, links resolve, and no file tells the history of its own development
(that is what git keeps).  Fast, and imports neither torch nor triton."""
import re
import subprocess

from netdsl import ops

from conftest import ROOT

DOCS = ROOT / "docs"
LANGUAGE = DOCS / "language.md"

# Development-history wording: numbered or relative work periods, runs left
# for later, hardware that was or was not at hand.  (The words are split so
# that this file does not match its own patterns, nor a `git grep` for them.)
HISTORY = re.compile(
    r"\b(first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth"
    r"|next|previous|earlier|later|last|this|that|each|a|the) (GPU )?sess" r"ions?\b"
    r"|\bnot yet r" r"un\b|\bwas l" r"ent\b|\bno GPU w" r"as\b|\bnext t" r"ime\b",
    re.IGNORECASE,
)


def tracked_text_files():
    """Tracked files, and new ones git does not ignore; text only."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, check=True).stdout
    for name in names.decode().split("\0"):
        if not name or name == "tests/test_docs.py":
            continue
        path = ROOT / name
        if not path.is_file():  # deleted in the working tree, not yet in the index
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue
        try:
            yield name, data.decode("utf-8")
        except UnicodeDecodeError:
            continue


def test_every_layer_has_a_reference_entry():
    lines = LANGUAGE.read_text().splitlines()
    entries = [l for l in lines if l.startswith("#") or l.startswith("|")]
    missing = [name for name in ops.OPS if not any(f"`{name}`" in l for l in entries)]
    assert not missing, f"docs/language.md has no heading or table row naming these layers: {missing}"


def test_front_pages_are_short():
    for name in ("README.md", "BENCHMARKS.md"):
        n = len((ROOT / name).read_text().splitlines())
        assert n <= 300, f"{name} has {n} lines (at most 300)"


def test_relative_links_resolve():
    link = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")
    broken = []
    for page in [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted(DOCS.glob("*.md"))]:
        for target, _ in link.findall(page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_no_development_history_in_tracked_files():
    hits = []
    for name, text in tracked_text_files():
        for i, line in enumerate(text.splitlines(), 1):
            m = HISTORY.search(line)
            if m:
                hits.append(f"{name}:{i}: {m.group(0)!r}: {line.strip()[:100]}")
    assert not hits, "development history belongs in git, not in files:\n" + "\n".join(hits)
