"""The web chat's browser libraries: which files the page asks for under ``/vendor``, and where they are found.

The Markdown parser, the HTML sanitiser and the code highlighter come from the npm registry into ``web/node_modules``
(``npm ci``, run by ``make install``); nothing is committed. A built wheel carries copies of the files the page needs
in ``polychat/server/static/vendor/`` (``setup.py`` copies them at build time, with the libraries' licences).

Lookup order: ``$POLYCHAT_WEB_DIR/node_modules`` when that variable is set, else the copies inside the installed
package, else ``web/node_modules`` beside ``src`` (a source checkout, an editable install).

This module imports nothing but the standard library: the build loads it by its path, before polychat is installed.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["LICENSES", "PACKAGED_DIR", "VENDOR", "library_path", "missing_libraries", "web_dir"]

# The browser libraries, by the name the page asks for: (npm package, file inside it).
VENDOR: dict[str, tuple[str, str]] = {
    "marked.js": ("marked", "lib/marked.esm.js"),
    "purify.js": ("dompurify", "dist/purify.es.mjs"),
    "highlight.js": ("@highlightjs/cdn-assets", "es/highlight.min.js"),
}

# The licence files each npm package ships, copied into the wheel too (``vendor/licenses/<package>/<file>``).
LICENSES: dict[str, tuple[str, ...]] = {
    "marked": ("LICENSE",),
    "dompurify": ("LICENSE", "LICENSE-MPL"),
    "@highlightjs/cdn-assets": ("LICENSE",),
}

# Where a built wheel keeps its copies (absent in a source checkout).
PACKAGED_DIR = Path(__file__).resolve().parents[1] / "static" / "vendor"


def web_dir() -> Path:
    """The ``web`` directory holding ``node_modules``: ``$POLYCHAT_WEB_DIR``, else the one beside ``src``."""
    configured = os.environ.get("POLYCHAT_WEB_DIR")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[4] / "web"


def library_path(name: str) -> Path:
    """Where the library the page asks for as ``/vendor/<name>`` is (it may not exist); ``KeyError`` if unknown."""
    package, inside = VENDOR[name]
    if not os.environ.get("POLYCHAT_WEB_DIR"):
        packaged = PACKAGED_DIR / name
        if packaged.is_file():
            return packaged
    return web_dir() / "node_modules" / package / inside


def missing_libraries(node_modules: Path) -> list[str]:
    """The files of :data:`VENDOR` (and their licences) that ``node_modules`` lacks, as paths inside it."""
    wanted = [f"{package}/{inside}" for package, inside in VENDOR.values()]
    wanted += [f"{package}/{licence}" for package, licences in LICENSES.items() for licence in licences]
    return [path for path in wanted if not (node_modules / path).is_file()]
