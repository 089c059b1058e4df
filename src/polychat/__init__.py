"""polychat: chat language models through interchangeable providers.

>>> import polychat
>>> polychat.Local().complete([{"role": "user", "content": "Hello"}], max_tokens=20).text  # doctest: +SKIP
>>> polychat.connect(polychat.Local(), polychat.H2o(url="http://127.0.0.1:1337")).complete(messages)  # doctest: +SKIP

The gpt4free calls stay as a compatibility layer:

>>> polychat.ChatCompletion.create("falcon-7b", messages)  # doctest: +SKIP
"""

from polychat import errors, providers
from polychat.client import ChatCompletion, Client, connect
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
    ServiceGoneError,
    StreamError,
    UnknownProviderError,
)
from polychat.providers import (
    TGI,
    Anthropic,
    Completion,
    Gravityengine,
    H2o,
    Local,
    Ollama,
    OpenAICompatible,
    Provider,
)
from polychat.providers.connections import Connections
from polychat.retry import DEFAULT_RETRY, RetryPolicy

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_RETRY",
    "TGI",
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AllProvidersFailedError",
    "Anthropic",
    "AuthRequiredError",
    "ChatCompletion",
    "Client",
    "Completion",
    "Connections",
    "Gravityengine",
    "H2o",
    "Local",
    "ModelNotFoundError",
    "Ollama",
    "OpenAICompatible",
    "PolychatError",
    "ProtocolError",
    "Provider",
    "ProviderError",
    "RateLimitError",
    "RetryPolicy",
    "ServiceGoneError",
    "StreamError",
    "UnknownProviderError",
    "__version__",
    "connect",
    "errors",
    "providers",
]
