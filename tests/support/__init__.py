"""Test helpers with real parts: a stub OpenAI-compatible LLM server, shared fixtures."""

__all__: list[str] = []
