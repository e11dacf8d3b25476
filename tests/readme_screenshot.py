"""The README's screenshot: the top of the Overview page as the browser test saw it
(``tests/test_browser.py`` saves every page under test-output/screenshots/), cropped to one
screen, scaled to 960 px wide and saved as a 128-colour PNG, small enough to keep in git.

    .venv/bin/python -m pytest tests/test_browser.py -s     # the shots (a few minutes)
    .venv/bin/python -m tests.readme_screenshot             # -> docs/img/overview.png
"""
from __future__ import annotations

import sys

from PIL import Image

from tests.conftest import REPO
from tests.test_browser import SCREENSHOTS

SOURCE = SCREENSHOTS / "overview.png"
TARGET = REPO / "docs" / "img" / "overview.png"
SCREEN = (1600, 1000)  # the browser test's viewport
WIDTH = 960


def main() -> int:
    if not SOURCE.exists():
        print(f"{SOURCE.relative_to(REPO)}: no such file; run the browser test first", file=sys.stderr)
        return 2
    shot = Image.open(SOURCE).convert("RGB").crop((0, 0, *SCREEN))
    small = shot.resize((WIDTH, WIDTH * SCREEN[1] // SCREEN[0]), Image.LANCZOS)
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    small.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(TARGET, optimize=True)
    print(f"wrote {TARGET.relative_to(REPO)} ({TARGET.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
