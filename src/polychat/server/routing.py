"""Which backend model answers a served model name."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import replace

from polychat.errors import ModelNotFoundError
from polychat.generation import GenerationRequest, Item
from polychat.providers.gravityengine import Gravityengine
from polychat.providers.h2o import H2o
from polychat.server.backends import Backend

__all__ = ["HISTORICAL_MODELS", "ModelRouter"]

# The model names of the original services; by default the server answers them with its own model.
HISTORICAL_MODELS: tuple[str, ...] = (*H2o.known_models(), *Gravityengine.model)


class ModelRouter:
    """Served names → a backend's own model names. The backend's names are served as they are."""

    def __init__(self, backend: Backend, aliases: Mapping[str, str] | None = None) -> None:
        self.backend = backend
        own = list(backend.models())
        if not own:
            raise ValueError("the backend serves no model")
        self.default_model = own[0]
        if aliases is None:
            aliases = {name: self.default_model for name in HISTORICAL_MODELS}
        self.aliases = {name: target for name, target in aliases.items() if name not in own}
        unknown = sorted({target for target in self.aliases.values() if target not in own})
        if unknown:
            raise ValueError(f"aliases point at models the backend does not serve: {', '.join(unknown)}")
        self._own = own

    def models(self) -> list[str]:
        return [*self._own, *self.aliases]

    def remove(self, name: str) -> None:
        """Stop serving a name (an alias, or one of the backend's own models)."""
        self.aliases.pop(name, None)
        if name in self._own and len(self._own) > 1:
            self._own.remove(name)

    def resolve(self, name: str) -> str:
        if name in self._own:
            return name
        try:
            return self.aliases[name]
        except KeyError:
            raise ModelNotFoundError(name, self.models(), "this server") from None

    def generate(self, request: GenerationRequest) -> AsyncIterator[Item]:
        return self.backend.generate(replace(request, model=self.resolve(request.model)))

    def serves(self, names: Sequence[str]) -> bool:
        return all(name in self._own or name in self.aliases for name in names)
