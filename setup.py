"""The build steps pyproject.toml cannot declare: the web chat's browser libraries go into the sdist and the wheel.

They come from ``web/node_modules`` (``make install`` runs ``npm ci`` in ``web/``) and are not committed. The sdist
carries the needed files at their ``web/node_modules`` paths; the wheel carries them as package data in
``polychat/server/static/vendor/`` (with their licences), where ``polychat serve`` looks first. An editable install
copies nothing: it serves them from ``web/node_modules`` itself. Everything else is in pyproject.toml.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist
from setuptools.errors import FileError

ROOT = Path(__file__).resolve().parent
NODE_MODULES = Path("web") / "node_modules"


def _vendor() -> ModuleType:
    """``polychat.server.faces.vendor``, loaded by its path (polychat and its dependencies are not installed here)."""
    spec = importlib.util.spec_from_file_location("_polychat_vendor", ROOT / "src/polychat/server/faces/vendor.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _checked(node_modules: Path) -> ModuleType:
    vendor = _vendor()
    missing = vendor.missing_libraries(node_modules)
    if missing:
        raise FileError(
            f"the web chat's browser libraries are missing from {node_modules} ({', '.join(missing)}): "
            "run `make install` (or `npm ci` in web/) before building"
        )
    return vendor


class BuildPy(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        node_modules = ROOT / NODE_MODULES
        vendor = _checked(node_modules)
        target = Path(self.build_lib) / "polychat" / "server" / "static" / "vendor"
        target.mkdir(parents=True, exist_ok=True)
        for name, (package, inside) in vendor.VENDOR.items():
            self.copy_file(str(node_modules / package / inside), str(target / name))
        for package, licences in vendor.LICENSES.items():
            (target / "licenses" / package).mkdir(parents=True, exist_ok=True)
            for licence in licences:
                self.copy_file(str(node_modules / package / licence), str(target / "licenses" / package / licence))


class Sdist(sdist):
    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        vendor = _checked(ROOT / NODE_MODULES)
        for name in vendor.missing_libraries(Path(base_dir) / NODE_MODULES):
            target = Path(base_dir) / NODE_MODULES / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ROOT / NODE_MODULES / name, target)


setup(cmdclass={"build_py": BuildPy, "sdist": Sdist})
