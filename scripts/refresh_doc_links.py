"""Re-point the `[FILE.py:N](../tegaki/FILE.py#LN) `code`` links in docs/ (model.py, moe.py, ...) at
the lines where the quoted code now stands. Run after editing those files:
python scripts/refresh_doc_links.py"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\[(\w+)\.py:(\d+)\]\(\.\./tegaki/\1\.py#L(\d+)\) `([^`]+)`")


def source_lines(name: str) -> list[str]:
    return (ROOT / "tegaki" / f"{name}.py").read_text(encoding="utf-8").splitlines()


def refresh(doc: Path) -> int:
    text = doc.read_text(encoding="utf-8")
    changed = 0

    def fix(m: re.Match) -> str:
        nonlocal changed
        name, old, code = m.group(1), int(m.group(3)), m.group(4)
        found = [i + 1 for i, line in enumerate(source_lines(name)) if code in line]
        if not found:
            raise SystemExit(f"{doc.name}: {name}.py does not have `{code}`; edit the doc by hand")
        new = min(found, key=lambda n: abs(n - old))  # the nearest occurrence to where it was
        changed += new != old
        return f"[{name}.py:{new}](../tegaki/{name}.py#L{new}) `{code}`"

    text = LINK.sub(fix, text)
    if changed:
        tmp = doc.with_name(doc.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(doc)
    return changed


if __name__ == "__main__":
    for doc in sorted((ROOT / "docs").glob("*.md")):
        n = refresh(doc)
        if n:
            print(f"{doc.relative_to(ROOT)}: {n} link(s) moved")
