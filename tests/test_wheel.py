"""The built package, used the way a user gets it: ``python -m build``, then the wheel in a fresh venv elsewhere.

The wheel is installed with pip into a new virtual environment in a temporary directory (its dependencies come from
pip's cache or PyPI), and ``polychat serve`` runs from there, in a directory outside the repository, with nothing of
the source tree on its path: the web chat must load in a browser with every file it asks for, its browser libraries
included. Select these tests with ``-m wheel``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from polychat.server.faces.vendor import VENDOR, library_path
from tests.browser import Chat
from tests.support import polychat_serve_process

pytestmark = [pytest.mark.wheel, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[1]


def _run(*command: str | Path, timeout: float, **options: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, timeout=timeout, check=False, **options
    )


def _clean_env() -> dict[str, str]:
    """This environment without what points at the source tree (the installed package must stand alone)."""
    return {name: value for name, value in os.environ.items() if name not in ("PYTHONPATH", "POLYCHAT_WEB_DIR")}


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist and the wheel ``python -m build`` makes of this checkout (``make dist`` runs the same)."""
    pytest.importorskip("build", reason="build is not installed (make install)")
    missing = [name for name in VENDOR if not library_path(name).is_file()]
    if missing:
        pytest.skip(f"the web chat's libraries are not installed ({', '.join(missing)}): make install runs npm ci")
    out = tmp_path_factory.mktemp("dist")
    built = _run(sys.executable, "-m", "build", "--outdir", out, REPO, timeout=180)
    assert built.returncode == 0, built.stdout + built.stderr
    return out


@pytest.fixture(scope="module")
def installed(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv, outside the repository, with the built wheel installed by pip; returns its ``bin``."""
    venv = tmp_path_factory.mktemp("venv")
    created = _run(sys.executable, "-m", "venv", venv, timeout=120)
    assert created.returncode == 0, created.stderr
    (wheel,) = dist.glob("polychat-*.whl")
    bin_dir = venv / "bin"
    pip = (bin_dir / "python", "-m", "pip", "install", "--progress-bar", "off", "--disable-pip-version-check")
    done = _run(*pip, wheel, timeout=180, env=_clean_env())
    assert done.returncode == 0, done.stdout + done.stderr
    return bin_dir


@pytest.fixture
def wheel_server(installed: Path, tmp_path: Path) -> Iterator[str]:
    """The installed ``polychat serve`` (echo backend), started from a directory outside the repository."""
    with polychat_serve_process(
        "--backend", "echo", program=[str(installed / "polychat")], cwd=str(tmp_path), env=_clean_env()
    ) as url:
        yield url


def test_sdist_and_wheel_carry_the_browser_libraries(dist: Path) -> None:
    (wheel,) = dist.glob("polychat-*.whl")
    (sdist,) = dist.glob("polychat-*.tar.gz")
    listed = _run(sys.executable, "-m", "zipfile", "-l", wheel, timeout=30).stdout
    for name in VENDOR:
        assert f"polychat/server/static/vendor/{name}" in listed
    assert "polychat/server/static/vendor/licenses/dompurify/LICENSE" in listed
    assert "node_modules" not in listed
    for package, inside in VENDOR.values():
        assert f"web/node_modules/{package}/{inside}" in _run("tar", "tzf", sdist, timeout=30).stdout


def test_installed_wheel_runs_from_its_venv(installed: Path, tmp_path: Path) -> None:
    where = _run(
        installed / "python",
        "-c",
        "import polychat.server.faces.vendor as v; print(v.__file__); print(v.library_path('marked.js'))",
        timeout=60,
        cwd=tmp_path,
        env=_clean_env(),
    )
    module, marked = where.stdout.split()
    assert module.startswith(str(installed.parent)) and marked.startswith(str(installed.parent)), where.stdout
    assert Path(marked).read_bytes() == library_path("marked.js").read_bytes()


def test_installed_wheel_serves_the_web_chat_with_no_failed_request(
    wheel_server: str, open_chat: Callable[..., Chat]
) -> None:
    for name in VENDOR:
        answer = httpx.get(f"{wheel_server}/vendor/{name}", timeout=5)
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/javascript"), name
    chat = open_chat(wheel_server)
    chat.open()
    assert chat.page.evaluate("document.body.dataset.renderer") == "markdown"
    chat.send("Hello from an installed **wheel**")
    assert chat.assistant_texts() == ["Hello from an installed wheel"]
    assert chat.page.locator("[data-testid=message-assistant] .content strong").inner_text() == "wheel"
    assert all(request.startswith(wheel_server) for request in chat.log.requests)
    chat.log.assert_clean()


def test_build_without_the_browser_libraries_says_how_to_get_them(tmp_path: Path) -> None:
    pytest.importorskip("build", reason="build is not installed (make install)")
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (tmp_path / "web").mkdir()
    built = _run(sys.executable, "-m", "build", "--outdir", tmp_path / "dist", tmp_path, timeout=180)
    assert built.returncode != 0
    assert "browser libraries are missing" in built.stdout + built.stderr
    assert "npm ci" in built.stdout + built.stderr
    assert not (tmp_path / "dist").exists() or not list((tmp_path / "dist").glob("*.whl"))
