"""Re-point the `[model.py:N](../tegaki/model.py#LN) `code`` links in docs/ at the lines where the
quoted code now stands. Run after editing model.py: python scripts/refresh_doc_links.py"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\[model\.py:(\d+)\]\(\.\./tegaki/model\.py#L(\d+)\) `([^`]+)`")


def refresh(doc: Path, source: list[str]) -> int:
    text = doc.read_text(encoding="utf-8")
    changed = 0

    def fix(m: re.Match) -> str:
        nonlocal changed
        code, old = m.group(3), int(m.group(2))
        found = [i + 1 for i, line in enumerate(source) if code in line]
        if not found:
            raise SystemExit(f"{doc.name}: model.py no longer has `{code}`; edit the doc by hand")
        new = min(found, key=lambda n: abs(n - old))  # the nearest occurrence to where it was
        changed += new != old
        return f"[model.py:{new}](../tegaki/model.py#L{new}) `{code}`"

    doc.write_text(LINK.sub(fix, text), encoding="utf-8")
    return changed


if __name__ == "__main__":
    source = (ROOT / "tegaki" / "model.py").read_text(encoding="utf-8").splitlines()
    for doc in sorted((ROOT / "docs").glob("*.md")):
        n = refresh(doc, source)
        if n:
            print(f"{doc.relative_to(ROOT)}: {n} link(s) moved")
