"""Content-addressed input blobs in Redis.

A run's inputs (a whole corpus, often) are stored once under ``keys.blob_key(sha256)`` as
JSON and referenced from run specs by digest, so a task message stays small and many runs
share one uploaded corpus. The digest covers the stored bytes, so a read can verify them.

No Redis value is larger than ``CHUNK_BYTES`` (Redis refuses one over 512 MB, its
``proto-max-bulk-len``, by closing the connection): a larger blob is stored as chunks under
``keys.blob_chunk_key`` (each by its own digest), written first, then a small manifest under the
blob's key that names them, so a reader never sees a manifest whose chunks are not all there.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import redis

from rlmq.store import keys, replies

__all__ = ["CHUNK_BYTES", "BlobError", "blob_size", "encode_blob", "get_blob", "get_blobs", "put_blob", "put_blobs"]

DEFAULT_TTL_SECONDS = 30 * 24 * 3600
CHUNK_BYTES = 64 * 1024 * 1024
_MANIFEST = b"\x00rlmq-chunks\x00"  # no JSON text starts with NUL: a manifest cannot be a blob


class BlobError(LookupError):
    """A referenced blob is missing or does not match its digest."""


def encode_blob(value: Any) -> tuple[str, bytes]:
    """(sha256 hex, bytes) of a JSON value; key order is canonical so equal values share a blob."""
    data = json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    return hashlib.sha256(data).hexdigest(), data


def put_blob(client: redis.Redis, value: Any, *, ttl_seconds: int | None = DEFAULT_TTL_SECONDS,
             chunk_bytes: int = CHUNK_BYTES) -> str:
    """Store ``value`` once (an existing blob only has its TTL refreshed); return its digest."""
    digest, data = encode_blob(value)
    if len(data) <= chunk_bytes:
        _put(client, keys.blob_key(digest), data, ttl_seconds)
        return digest
    chunks = []
    for start in range(0, len(data), chunk_bytes):
        part = data[start:start + chunk_bytes]
        chunks.append(hashlib.sha256(part).hexdigest())
        _put(client, keys.blob_chunk_key(chunks[-1]), part, ttl_seconds)
    manifest = json.dumps({"size": len(data), "chunks": chunks}).encode()
    _put(client, keys.blob_key(digest), _MANIFEST + manifest, ttl_seconds)
    return digest


def _put(client: redis.Redis, key: str, data: bytes, ttl_seconds: int | None) -> None:
    pipe = client.pipeline(transaction=False)
    pipe.set(key, data, nx=True)
    if ttl_seconds:
        pipe.expire(key, ttl_seconds)
    pipe.execute()


def put_blobs(client: redis.Redis, values: Mapping[str, Any], **kwargs: Any) -> dict[str, str]:
    """{name: digest} for {name: value}."""
    return {name: put_blob(client, value, **kwargs) for name, value in values.items()}


def get_blob(client: redis.Redis, digest: str, *, verify: bool = True) -> Any:
    stored = client.get(keys.blob_key(digest))
    if stored is None:
        raise BlobError(f"input blob {digest[:12]}… is missing from Redis (expired or never uploaded)")
    data: bytes | bytearray = replies.raw(stored)
    if data.startswith(_MANIFEST):
        data = _join_chunks(client, digest, json.loads(data[len(_MANIFEST):]))
    if verify and hashlib.sha256(data).hexdigest() != digest:
        raise BlobError(f"input blob {digest[:12]}… does not match its digest")
    return json.loads(data)


def _join_chunks(client: redis.Redis, digest: str, manifest: dict[str, Any]) -> bytearray:
    joined = bytearray()
    for n, chunk in enumerate(manifest["chunks"]):
        part = client.get(keys.blob_chunk_key(chunk))
        if part is None:
            raise BlobError(f"input blob {digest[:12]}… lost its chunk {n + 1} of {len(manifest['chunks'])} "
                            "(expired or evicted)")
        joined += replies.raw(part)
    return joined


def blob_size(client: redis.Redis, digest: str) -> int:
    """The stored size in bytes of a blob (0 if it is missing), without reading a chunked one."""
    head = client.getrange(keys.blob_key(digest), 0, len(_MANIFEST) - 1)
    if head != _MANIFEST:
        return int(client.strlen(keys.blob_key(digest)))
    manifest = client.get(keys.blob_key(digest))
    return int(json.loads(manifest[len(_MANIFEST):])["size"]) if manifest else 0


def get_blobs(client: redis.Redis, refs: Mapping[str, str], *, verify: bool = True) -> dict[str, Any]:
    """{name: value} for {name: digest}; one blob shared by two names is read once."""
    cache: dict[str, Any] = {}
    out: dict[str, Any] = {}
    for name, digest in refs.items():
        if digest not in cache:
            cache[digest] = get_blob(client, digest, verify=verify)
        out[name] = cache[digest]
    return out
