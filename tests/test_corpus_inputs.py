"""A corpus read from its files while it is stored (``rlmq.inputs.StreamedInput`` through
``Client.store_inputs``, what ``rlmq submit --input NAME=@dir`` / ``@rows.jsonl`` does) reaches a sandbox
whole: through a real Redis, in chunks, then the worker's read of it, into a real local sandbox."""

from __future__ import annotations

import hashlib
import json

import pytest

from rlmq.client import Client
from rlmq.inputs import InputError, StreamedInput, open_input_value
from rlmq.store.blobs import get_blobs

CHUNK = 100 * 1024  # small chunks, so these inputs of ~0.7 MB cross Redis as several values


@pytest.fixture
def client(redis_url):
    client = Client(redis_url, blob_chunk_bytes=CHUNK)
    yield client
    client.close()


def test_a_streamed_jsonl_and_directory_arrive_intact_in_the_sandbox(client, r, tmp_path, sandbox_pool):
    rows = [{"id": n, "text": f"document {n} é " + "z" * 200, "tags": ["a", n % 7]} for n in range(3000)]
    jsonl = tmp_path / "docs.jsonl"
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    lines.insert(100, "   ")  # blank lines are skipped; Windows line ends are lines too
    jsonl.write_bytes(("\r\n".join(lines[:500]) + "\n" + "\n".join(lines[500:]) + "\n").encode())
    folder = tmp_path / "pages"
    folder.mkdir()
    pages = [f"page {n}\n" + "word " * 300 for n in range(40)]
    for n, page in enumerate(pages):
        (folder / f"p{n:03d}.txt").write_text(page, encoding="utf-8")
    (folder / ".hidden").write_text("not an input")

    opened = {"docs": open_input_value(f"@{jsonl}"), "pages": open_input_value(f"@{folder}")}
    assert all(isinstance(value, StreamedInput) for value in opened.values())  # nothing read yet
    refs, described = client.store_inputs(opened)
    assert described["docs"].startswith("list[3000], ") and described["pages"].startswith("list[40], ")
    assert max(int(r.strlen(key)) for key in r.scan_iter("rlmq:blob*")) <= CHUNK
    assert len(list(r.scan_iter("rlmq:blob-chunk:*"))) >= 6

    inputs = get_blobs(r, refs)  # what the worker reads before the run's first step
    expected = hashlib.sha256(json.dumps([rows, pages], sort_keys=True).encode()).hexdigest()
    with sandbox_pool.lend("local") as interp:
        out = interp.execute("import hashlib, json\n"
                             "print(len(docs), len(pages), hashlib.sha256(json.dumps([docs, pages], sort_keys=True).encode()).hexdigest())",
                             inputs)
    assert out == f"3000 40 {expected}"


def test_a_bad_line_deep_in_a_streamed_file_is_an_input_error_and_records_nothing(client, r, tmp_path):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"n": n, "text": "x" * 100}) + "\n" for n in range(5000)) + "{oops\n")
    with pytest.raises(InputError, match=r"docs.jsonl line 5001 is not valid JSON"):
        client.store_inputs({"docs": open_input_value(f"@{jsonl}")})
    assert list(r.scan_iter("rlmq:blob:*")) == []  # chunks may wait for their TTL; no blob names them
