"""tokioloop: a Tokio-driven asyncio event loop with await from sync code."""

from . import _tokioloop  # noqa: F401

__all__: list[str] = []
