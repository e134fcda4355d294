"""A run's inputs, read from Redis once: the values the RLM binds, and, for each large one, its stored
JSON text as what the sandbox receives (``StoredInput``).

The sandbox gets the blob's own bytes, read from Redis again when the sandbox is first sent the input,
so the worker never encodes a corpus it has just decoded (1,000,000 documents: ~9 s and ~2 GB of a
second and third copy) and does not keep the text while the run works.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

import redis

from broker_bridge import StoredInput
from rlmq.store.blobs import get_blob_bytes

__all__ = ["load_run_inputs"]


def load_run_inputs(client: redis.Redis, refs: Mapping[str, str]) -> tuple[dict[str, Any], list[StoredInput]]:
    """({name: value}, the values' stored texts) for {name: digest}; one blob shared by two names is read once."""
    values: dict[str, Any] = {}
    stored: dict[str, StoredInput] = {}
    for name, digest in refs.items():
        if digest not in stored:
            data = get_blob_bytes(client, digest)
            stored[digest] = StoredInput(json.loads(data), digest, len(data),
                                         functools.partial(get_blob_bytes, client, digest))
            del data  # the value is kept, its text is read again when a sandbox needs it
        values[name] = stored[digest].value
    return values, list(stored.values())
