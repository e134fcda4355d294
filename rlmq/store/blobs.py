"""Content-addressed input blobs in Redis.

A run's inputs (a whole corpus, often) are stored once under ``keys.blob_key(sha256)`` as
JSON and referenced from run specs by digest, so a task message stays small and many runs
share one uploaded corpus. The digest covers the stored bytes, so a read can verify them.

No Redis value is larger than ``CHUNK_BYTES`` (Redis refuses one over 512 MB, its
``proto-max-bulk-len``, by closing the connection): a larger blob is stored as chunks under
``keys.blob_chunk_key`` (each by its own digest), written first, then a small manifest under the
blob's key that names them, so a reader never sees a manifest whose chunks are not all there.

``put_items`` stores a list given item by item (a corpus read from files as it is stored) as
``put_blob`` would store the whole list, byte for byte, holding one chunk at a time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis

from rlmq.store import keys, replies

__all__ = ["CHUNK_BYTES", "BlobError", "StoredList", "blob_size", "encode_blob", "get_blob", "get_blob_bytes",
           "get_blobs", "put_blob", "put_blobs", "put_items"]

DEFAULT_TTL_SECONDS = 30 * 24 * 3600
CHUNK_BYTES = 64 * 1024 * 1024
_MANIFEST = b"\x00rlmq-chunks\x00"  # no JSON text starts with NUL: a manifest cannot be a blob


class BlobError(LookupError):
    """A referenced blob is missing or does not match its digest."""


def encode_blob(value: Any) -> tuple[str, bytes]:
    """(sha256 hex, bytes) of a JSON value; key order is canonical so equal values share a blob."""
    data = _canonical(value)
    return hashlib.sha256(data).hexdigest(), data


def _canonical(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


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


@dataclass(frozen=True)
class StoredList:
    """What ``put_items`` stored: the blob's digest, how many items, and its size in bytes."""

    digest: str
    items: int
    size: int


def put_items(client: redis.Redis, items: Iterable[Any], *, ttl_seconds: int | None = DEFAULT_TTL_SECONDS,
              chunk_bytes: int = CHUNK_BYTES) -> StoredList:
    """Store the list of ``items`` as ``put_blob(list(items))`` would (the same bytes, chunks and digest),
    encoding them one by one and writing each chunk as it fills: one chunk is held, never the list.
    If ``items`` raises, the chunks written so far stay unreferenced (no manifest) until their TTL."""
    whole = hashlib.sha256()
    buffer = bytearray(b"[")
    chunks: list[str] = []
    count = size = 0

    def write_chunk() -> None:
        nonlocal size
        with memoryview(buffer) as view, view[:chunk_bytes] as part:  # sent as it lies: no copy of a chunk
            size += len(part)
            whole.update(part)
            chunks.append(hashlib.sha256(part).hexdigest())
            _put(client, keys.blob_chunk_key(chunks[-1]), part, ttl_seconds)
        del buffer[:chunk_bytes]

    for item in items:
        if count:
            buffer += b","
        buffer += _canonical(item)
        count += 1
        while len(buffer) > chunk_bytes:  # more than a chunk: the blob is chunked, this chunk is final
            write_chunk()
    buffer += b"]"
    if not chunks and len(buffer) <= chunk_bytes:
        data = bytes(buffer)
        digest = hashlib.sha256(data).hexdigest()
        _put(client, keys.blob_key(digest), data, ttl_seconds)
        return StoredList(digest, count, len(data))
    while buffer:
        write_chunk()
    digest = whole.hexdigest()
    manifest = json.dumps({"size": size, "chunks": chunks}).encode()
    _put(client, keys.blob_key(digest), _MANIFEST + manifest, ttl_seconds)
    return StoredList(digest, count, size)


def _put(client: redis.Redis, key: str, data: bytes | memoryview, ttl_seconds: int | None) -> None:
    pipe = client.pipeline(transaction=False)
    pipe.set(key, data, nx=True)
    if ttl_seconds:
        pipe.expire(key, ttl_seconds)
    pipe.execute()


def put_blobs(client: redis.Redis, values: Mapping[str, Any], **kwargs: Any) -> dict[str, str]:
    """{name: digest} for {name: value}."""
    return {name: put_blob(client, value, **kwargs) for name, value in values.items()}


def get_blob(client: redis.Redis, digest: str, *, verify: bool = True) -> Any:
    return json.loads(get_blob_bytes(client, digest, verify=verify))


def get_blob_bytes(client: redis.Redis, digest: str, *, verify: bool = True) -> bytes | bytearray:
    """A blob's stored JSON text, its chunks joined."""
    stored = client.get(keys.blob_key(digest))
    if stored is None:
        raise BlobError(f"input blob {digest[:12]}… is missing from Redis (expired or never uploaded)")
    data: bytes | bytearray = replies.raw(stored)
    if data.startswith(_MANIFEST):
        data = _join_chunks(client, digest, json.loads(data[len(_MANIFEST):]))
    if verify and hashlib.sha256(data).hexdigest() != digest:
        raise BlobError(f"input blob {digest[:12]}… does not match its digest")
    return data


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
