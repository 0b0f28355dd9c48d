"""Python clients of a Loftey server (loftey.v1.Generation).

    from loftey.client import LofteyClient

    with LofteyClient("127.0.0.1:50051") as client:
        print(client.chat("Hello", temperature=0, max_new_tokens=32).text)
        for chunk in client.stream("Once upon a time", max_new_tokens=64):
            print(chunk.text, end="", flush=True)
"""

from loftey.client.client import DEFAULT_ADDRESS, AsyncLofteyClient, LofteyClient
from loftey.client.types import (
    Completion,
    GeneratedLogprobs,
    LofteyError,
    ModelInfo,
    StreamChunk,
    Timing,
    TokenLogprob,
    Usage,
)

__all__ = [
    "DEFAULT_ADDRESS",
    "AsyncLofteyClient",
    "Completion",
    "GeneratedLogprobs",
    "LofteyClient",
    "LofteyError",
    "ModelInfo",
    "StreamChunk",
    "Timing",
    "TokenLogprob",
    "Usage",
]
