"""Providers: one small module per backend, all with the same contract (see :mod:`polychat.providers.base`).

Built-in providers are registered the same way as third-party ones: :func:`register` a class, or expose it under
the ``polychat.providers`` entry-point group.
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points

from polychat.errors import UnknownProviderError
from polychat.providers.anthropic import Anthropic
from polychat.providers.base import AsyncTextStream, CompletionRequest, HttpProvider, Provider, TextStream
from polychat.providers.gravityengine import Gravityengine
from polychat.providers.h2o import H2o
from polychat.providers.local import Local
from polychat.providers.ollama import Ollama
from polychat.providers.openai_compatible import OpenAICompatible
from polychat.providers.openai_responses import OpenAIResponses
from polychat.providers.primary import Completion, primary_api
from polychat.providers.tgi import TGI

__all__ = [
    "TGI",
    "Anthropic",
    "AsyncTextStream",
    "Completion",
    "CompletionRequest",
    "Gravityengine",
    "H2o",
    "HttpProvider",
    "Local",
    "Ollama",
    "OpenAICompatible",
    "OpenAIResponses",
    "Provider",
    "TextStream",
    "all_providers",
    "get_provider",
    "primary_api",
    "register",
]

log = logging.getLogger(__name__)

_REGISTRY: dict[str, type[Provider]] = {}
_entry_points_loaded = False


def register(provider: type[Provider]) -> type[Provider]:
    """Make a provider class known by its name (usable as a class decorator)."""
    _REGISTRY[provider.__name__.lower()] = provider
    return provider


for _builtin in (Local, H2o, Gravityengine, OpenAICompatible, Anthropic, Ollama, OpenAIResponses, TGI):
    register(_builtin)


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for point in entry_points(group="polychat.providers"):
        try:
            register(point.load())
        except Exception as exc:
            log.warning("provider plugin %s failed to load: %s", point.name, exc)


def all_providers() -> list[type[Provider]]:
    _load_entry_points()
    return list(_REGISTRY.values())


def get_provider(name: str) -> type[Provider]:
    """The provider class registered under ``name`` (case does not matter); :class:`UnknownProviderError` if none."""
    _load_entry_points()
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        raise UnknownProviderError(name, [p.__name__ for p in _REGISTRY.values()]) from None
