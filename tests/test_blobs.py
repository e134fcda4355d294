"""Input blobs in Redis: content-addressed, and chunked past a size so no Redis value is ever one Redis
refuses (a 600 MB corpus once failed as "cannot reach Redis": Redis drops a connection that sends a
value over its ``proto-max-bulk-len``). A private Redis with that limit at its 1 MB minimum shows it at
small scale."""

from __future__ import annotations

import collections.abc

import pytest
import redis

from rlmq.local_redis import PrivateRedis, start_private_redis
from rlmq.store import keys
from rlmq.store.blobs import BlobError, blob_size, encode_blob, get_blob, get_blobs, put_blob, put_items

CORPUS = [f"document {i}: " + "lorem ipsum " * 20 for i in range(12_000)]  # ~3 MB of JSON


@pytest.fixture(scope="module")
def small_redis() -> collections.abc.Iterator[PrivateRedis]:
    with start_private_redis() as server:
        redis.Redis.from_url(server.url).config_set("proto-max-bulk-len", 1024 * 1024)
        yield server


@pytest.fixture
def r(small_redis: PrivateRedis) -> collections.abc.Iterator[redis.Redis]:
    client = redis.Redis.from_url(small_redis.url)
    client.flushall()
    yield client
    client.close()


def largest_value(client: redis.Redis) -> int:
    return max(int(client.strlen(k)) for k in client.scan_iter("rlmq:*"))


def test_a_value_over_redis_limit_is_refused_unchunked(r: redis.Redis) -> None:
    """The failure chunking exists for, at small scale: Redis drops the connection."""
    with pytest.raises(redis.ConnectionError):
        put_blob(r, CORPUS, chunk_bytes=10**9)


def test_a_large_blob_is_stored_in_chunks_and_read_back_whole(r: redis.Redis) -> None:
    digest = put_blob(r, CORPUS, chunk_bytes=512 * 1024)
    _, data = encode_blob(CORPUS)
    assert digest == encode_blob(CORPUS)[0]
    assert largest_value(r) <= 512 * 1024 < len(data)
    assert len(list(r.scan_iter("rlmq:blob-chunk:*"))) == -(-len(data) // (512 * 1024))
    assert get_blob(r, digest) == CORPUS
    assert get_blobs(r, {"a": digest, "b": digest}) == {"a": CORPUS, "b": CORPUS}
    assert blob_size(r, digest) == len(data)


def test_a_small_blob_is_one_value(r: redis.Redis) -> None:
    digest = put_blob(r, ["a", "b"])
    assert list(r.scan_iter("rlmq:*")) == [keys.blob_key(digest).encode()]
    assert get_blob(r, digest) == ["a", "b"] and blob_size(r, digest) == len(b'["a","b"]')


def test_storing_again_refreshes_and_shares(r: redis.Redis) -> None:
    first = put_blob(r, CORPUS, chunk_bytes=512 * 1024, ttl_seconds=60)
    count = len(list(r.scan_iter("rlmq:*")))
    assert put_blob(r, CORPUS, chunk_bytes=512 * 1024, ttl_seconds=3600) == first
    assert len(list(r.scan_iter("rlmq:*"))) == count
    assert all(r.ttl(k) > 60 for k in r.scan_iter("rlmq:*"))


def test_a_lost_chunk_is_a_one_line_error(r: redis.Redis) -> None:
    digest = put_blob(r, CORPUS, chunk_bytes=512 * 1024)
    r.delete(next(iter(r.scan_iter("rlmq:blob-chunk:*"))))
    with pytest.raises(BlobError, match=r"lost its chunk \d+ of \d+") as caught:
        get_blob(r, digest)
    assert "\n" not in str(caught.value)


def test_a_corrupted_chunk_fails_the_digest(r: redis.Redis) -> None:
    digest = put_blob(r, CORPUS, chunk_bytes=512 * 1024)
    chunk = next(iter(r.scan_iter("rlmq:blob-chunk:*")))
    r.setrange(chunk, 10, b"X")
    with pytest.raises(BlobError, match="does not match its digest"):
        get_blob(r, digest)


def stored(client: redis.Redis) -> dict[bytes, object]:
    return {key: client.get(key) for key in client.scan_iter("rlmq:*")}


@pytest.mark.parametrize("over_size", [None, -1, 0, 1], ids=["64KiB", "size-1", "size", "size+1"])
def test_items_streamed_are_stored_as_the_whole_list_would_be(r: redis.Redis, over_size: int | None) -> None:
    """``put_items`` (the client's streaming path) writes the very keys and bytes ``put_blob`` writes for the
    list: a corpus streamed from files and the same corpus given as a list share one blob; at the
    boundaries too (a blob exactly one chunk long is one value)."""
    corpus = CORPUS[:2000]  # ~500 KB: every chunk size here stays under this Redis's 1 MB value limit
    size = len(encode_blob(corpus)[1])
    chunk = 64 * 1024 if over_size is None else size + over_size
    digest = put_blob(r, corpus, chunk_bytes=chunk)
    whole = stored(r)
    r.flushall()
    streamed = put_items(r, iter(corpus), chunk_bytes=chunk)
    assert (streamed.digest, streamed.items, streamed.size) == (digest, len(corpus), size)
    assert stored(r) == whole
    assert get_blob(r, digest) == corpus


def test_an_empty_stream_is_an_empty_list(r: redis.Redis) -> None:
    assert put_items(r, iter([])).digest == put_blob(r, [])
