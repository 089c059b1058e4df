"""Gravityengine: an OpenAI-compatible proxy route in the ChatGPT-Next-Web style (``/api/openai/v1``)."""

from __future__ import annotations

from typing import Any, ClassVar

from polychat.providers.openai_compatible import OpenAICompatible

__all__ = ["Gravityengine"]


class Gravityengine(OpenAICompatible):
    """``POST {base}/api/openai/v1/chat/completions`` with the original body (temperature 0.7, presence_penalty 0).

    An access code, if the route wants one, goes in as the API key ``nk-<code>``. Its default URL, the 2023
    gpt4.xunika.uk service, no longer exists: give ``url=`` or ``POLYCHAT_GRAVITYENGINE_URL``.
    """

    url = "https://gpt4.xunika.uk"
    gone_url = url
    path: ClassVar[str] = "/api/openai/v1/chat/completions"
    models: ClassVar[dict[str, str]] = {}
    model: ClassVar[list[str]] = ["gpt-3.5-turbo-16k", "gpt-3.5-turbo-0613", "gpt-3.5-turbo"]
    default_model = "gpt-3.5-turbo-16k"
    accepts_any_model = False
    default_parameters: ClassVar[dict[str, Any]] = {"temperature": 0.7, "presence_penalty": 0}
    # The original body, exactly: the route forwards it unchanged, and 2023 upstreams knew no stream_options.
    request_usage: ClassVar[bool] = False
