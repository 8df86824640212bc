"""The README's claims that name a test or a file point at things that exist, and its copied snippets stay
identical to the sources that tests run."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def section(text: str, title: str) -> str:
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def fenced(text: str, lang: str) -> list:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def test_real_stack_snippet_is_the_tested_one():
    doc = (ROOT / "docs" / "real_stack.md").read_text(encoding="utf-8")
    ours = section(README, "Take it to the real stack")
    assert fenced(ours, "bash") == fenced(doc, "bash") and fenced(ours, "python") == fenced(doc, "python")


def test_every_test_file_and_doc_the_readme_names_exists():
    named = set(re.findall(r"`((?:tests|docs|benchmarks|exercises|minilora|notebooks)/[\w./-]+\.(?:py|md|ipynb))`",
                           README))
    named |= set(re.findall(r"\]\(((?:tests|docs|benchmarks|exercises|minilora|notebooks)/[\w./-]+)\)", README))
    assert len(named) > 10
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert missing == [], f"README names files that do not exist: {missing}"


def test_the_readme_quick_start_is_two_commands():
    quick = section(README, "Quick start")
    blocks = fenced(quick, "bash")
    assert [b.strip() for b in blocks[:2]] == ['pip install -e . && minilora demo',
                                               'python3 -m pip install -e ".[test]" && python3 -m pytest']


def test_every_docs_section_reference_resolves():
    """A comment, test or doc that cites `docs/<name>.md §N.M` points at a heading that exists."""
    import subprocess
    out = subprocess.run(["git", "grep", "-hIoE", r"docs/[a-z_]+\.md §[0-9]+(\.[0-9]+)*"], cwd=ROOT,
                         capture_output=True, text=True).stdout
    refs = set(out.split("\n")) - {""}
    assert refs, "expected some docs/…md § references"
    missing = []
    for ref in sorted(refs):
        doc, sec = ref.split(" §")
        headings = re.findall(r"^#+ ([0-9.]+)[ .]", (ROOT / doc).read_text(encoding="utf-8"), re.M)
        if sec not in {h.rstrip(".") for h in headings}:
            missing.append(ref)
    assert missing == [], f"references to sections that do not exist: {missing}"
