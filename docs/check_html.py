"""Checks the built site: every public name has its anchor, every notebook page shows a figure.

    python docs/check_html.py [docs/_build/html]

Public names are read from the modules' ``__all__`` (as the API pages are generated), so a new
public function without a page fails here. Exits 1 with the list of what is missing.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path

import bayesnoise

# the core modules (bn.sgld's module among them) and the pipeline's public modules
MODULES = [*bayesnoise._CORE, "sgld", "pipeline", "pipeline.config"]


def public_names() -> list[tuple[str, str]]:
    """(module, name) of every public function and class."""
    out = []
    for module in MODULES:
        mod = importlib.import_module(f"bayesnoise.{module}")
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                out.append((module, name))
    return out


def main(root: Path) -> int:
    pages = list(root.rglob("*.html"))
    if not pages:
        print(f"no HTML under {root}: build the site first (make docs)")
        return 1
    ids = set()
    for page in pages:
        ids.update(re.findall(r'id="([^"]+)"', page.read_text(encoding="utf-8", errors="replace")))
    missing = []
    for module, name in public_names():
        obj = getattr(importlib.import_module(f"bayesnoise.{module}"), name)
        candidates = {
            f"bayesnoise.{module}.{name}",
            f"bayesnoise.{name}",
            f"{getattr(obj, '__module__', '')}.{name}",
        }
        if not candidates & ids:
            missing.append(f"bayesnoise.{module}.{name}")
    notebooks = sorted((root / "notebooks").glob("*.html"))
    notebooks = [p for p in notebooks if p.name not in ("index.html",)]
    without_images = [
        p.name for p in notebooks if "<img" not in p.read_text(encoding="utf-8", errors="replace")
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} public names without an anchor: {', '.join(missing)}")
    if not notebooks:
        problems.append(f"no notebook pages under {root / 'notebooks'}")
    if without_images:
        problems.append(f"notebook pages without an image: {', '.join(without_images)}")
    if problems:
        print("\n".join(problems))
        return 1
    print(
        f"ok: {len(public_names())} public names have their anchors; {len(notebooks)} notebook "
        f"pages each show an image ({len(pages)} pages)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/_build/html")))
