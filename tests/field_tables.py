"""Tables of a request model's fields, each with a request that sets it and a check of the generation it reaches:
the tests that no field of a face's model is silently ignored."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import httpx
import pytest
from pydantic import BaseModel

from tests.support import ScriptedBackend

Check = Callable[[Any], bool]
# A field's name, the request fields that set it, and what the generation request must then show.
Table = Mapping[str, tuple[dict[str, Any], Check]]
Tables = Mapping[str, tuple[type[BaseModel], Table]]


def field_tests(tables: Tables, path: str, base: dict[str, Any]) -> tuple[Callable[[], None], Callable[..., None]]:
    """Two tests for a module to take as its own: every table names its model's fields, and each row's request
    (``base`` with the row's fields, posted to the app's ``path``) is answered with a generation its check accepts."""

    def names_every_field() -> None:
        wrong = {where: set(table) ^ set(model.model_fields) for where, (model, table) in tables.items()}
        assert not any(wrong.values()), wrong

    rows = [
        pytest.param(*row, id=f"{where}.{name}") for where, (_, table) in tables.items() for name, row in table.items()
    ]

    @pytest.mark.parametrize(("change", "check"), rows)
    def reaches_the_generation(gateway: Callable[..., str], change: dict[str, Any], check: Check) -> None:
        backend = ScriptedBackend()
        answer = httpx.post(gateway(backend) + path, json={**base, **change}, timeout=10)
        assert answer.status_code == 200, answer.text
        assert check(backend.requests[-1]), backend.requests[-1]

    return names_every_field, reaches_the_generation
