"""polychat: chat language models through interchangeable providers.

>>> import polychat
>>> polychat.ChatCompletion.create("falcon-7b", [{"role": "user", "content": "Hello"}])  # doctest: +SKIP
"""

from polychat import errors, providers
from polychat.client import ChatCompletion
from polychat.errors import (
    AllProvidersFailedError,
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthRequiredError,
    ModelNotFoundError,
    PolychatError,
    ProtocolError,
    ProviderError,
    RateLimitError,
    StreamError,
)
from polychat.providers import Gravityengine, H2o, Local, OpenAICompatible, Provider

__version__ = "0.1.0"

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AllProvidersFailedError",
    "AuthRequiredError",
    "ChatCompletion",
    "Gravityengine",
    "H2o",
    "Local",
    "ModelNotFoundError",
    "OpenAICompatible",
    "PolychatError",
    "ProtocolError",
    "Provider",
    "ProviderError",
    "RateLimitError",
    "StreamError",
    "__version__",
    "errors",
    "providers",
]
