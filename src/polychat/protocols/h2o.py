"""The H2O chat protocol (HuggingFace chat-ui, 2023): prompt format and request bodies (docs/protocols.md §1)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "DEFAULT_PARAMETERS",
    "SESSION_COOKIE",
    "conversation_body",
    "format_prompt",
    "message_body",
    "settings_form",
]

SESSION_COOKIE = "hf-chat"

DEFAULT_PARAMETERS: dict[str, Any] = {
    "temperature": 0.4,
    "truncate": 2048,
    "max_new_tokens": 1024,
    "do_sample": True,
    "repetition_penalty": 1.2,
    "return_full_text": False,
}


def format_prompt(messages: Sequence[Mapping[str, str]], *, answer_prefix: str = "assistant: ") -> str:
    """One ``role: content`` line per message, then the assistant's turn (the original provider's format)."""
    lines = "".join(f"{message['role']}: {message['content']}\n" for message in messages)
    return lines + answer_prefix


def settings_form(active_model: str) -> dict[str, str]:
    return {
        "ethicsModalAccepted": "true",
        "shareConversationsWithModelAuthors": "true",
        "ethicsModalAcceptedAt": "",
        "activeModel": active_model,
        "searchEnabled": "true",
    }


def conversation_body(model: str) -> dict[str, str]:
    return {"model": model}


def message_body(inputs: str, parameters: Mapping[str, Any], *, stream: bool = True) -> dict[str, Any]:
    return {
        "inputs": inputs,
        "parameters": dict(parameters),
        "stream": stream,
        "options": {
            "id": str(uuid.uuid4()),
            "response_id": str(uuid.uuid4()),
            "is_retry": False,
            "use_cache": False,
            "web_search_id": "",
        },
    }
