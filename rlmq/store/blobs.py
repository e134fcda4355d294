"""Content-addressed input blobs in Redis.

A run's inputs (a whole corpus, often) are stored once under ``keys.blob_key(sha256)`` as
JSON and referenced from run specs by digest, so a task message stays small and many runs
share one uploaded corpus. The digest covers the stored bytes, so a read can verify them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import redis

from rlmq.store import keys, replies

__all__ = ["BlobError", "encode_blob", "get_blob", "get_blobs", "put_blob", "put_blobs"]

DEFAULT_TTL_SECONDS = 30 * 24 * 3600


class BlobError(LookupError):
    """A referenced blob is missing or does not match its digest."""


def encode_blob(value: Any) -> tuple[str, bytes]:
    """(sha256 hex, bytes) of a JSON value; key order is canonical so equal values share a blob."""
    data = json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    return hashlib.sha256(data).hexdigest(), data


def put_blob(client: redis.Redis, value: Any, *, ttl_seconds: int | None = DEFAULT_TTL_SECONDS) -> str:
    """Store ``value`` once (an existing blob only has its TTL refreshed); return its digest."""
    digest, data = encode_blob(value)
    key = keys.blob_key(digest)
    pipe = client.pipeline(transaction=False)
    pipe.set(key, data, nx=True)
    if ttl_seconds:
        pipe.expire(key, ttl_seconds)
    pipe.execute()
    return digest


def put_blobs(client: redis.Redis, values: Mapping[str, Any], **kwargs: Any) -> dict[str, str]:
    """{name: digest} for {name: value}."""
    return {name: put_blob(client, value, **kwargs) for name, value in values.items()}


def get_blob(client: redis.Redis, digest: str, *, verify: bool = True) -> Any:
    data = client.get(keys.blob_key(digest))
    if data is None:
        raise BlobError(f"input blob {digest[:12]}… is missing from Redis (expired or never uploaded)")
    if verify and hashlib.sha256(replies.raw(data)).hexdigest() != digest:
        raise BlobError(f"input blob {digest[:12]}… does not match its digest")
    return json.loads(data)


def get_blobs(client: redis.Redis, refs: Mapping[str, str], *, verify: bool = True) -> dict[str, Any]:
    """{name: value} for {name: digest}; one blob shared by two names is read once."""
    cache: dict[str, Any] = {}
    out: dict[str, Any] = {}
    for name, digest in refs.items():
        if digest not in cache:
            cache[digest] = get_blob(client, digest, verify=verify)
        out[name] = cache[digest]
    return out
