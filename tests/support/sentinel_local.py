"""Redis with Sentinel on this machine's loopback: a primary, a replica and three Sentinels (quorum 2)
on free ports, passwords on the servers and on the Sentinels, failing over in about a second.

The multi-host version (``tests.support.hosts.sentinel``) puts each on a host of its own; this one
is for tests of what every rlmq client does with a ``sentinel://`` URL, which needs no namespaces.
``url()`` is rlmq's form of the deployment (``rlmq.redis_url``); ``failover()`` asks the Sentinels
to promote the replica (a planned switch), ``kill_primary()`` kills the primary (a lost host), and
each waits until the Sentinels name the new one.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import redis

from rlmq.local_redis import PrivateRedis, find_redis_server, start_private_redis
from tests.support.hosts.sentinel import MASTER_NAME, sentinel_config
from tests.support.net import free_port
from tests.support.wait import wait_until

__all__ = ["MASTER_NAME", "LoopbackSentinel"]


@dataclass
class LoopbackSentinel:
    password: str = field(default_factory=lambda: secrets.token_urlsafe(12), repr=False)
    sentinel_password: str = field(default_factory=lambda: secrets.token_urlsafe(12), repr=False)
    servers: list[PrivateRedis] = field(default_factory=list)
    sentinels: list[tuple[int, subprocess.Popen[bytes]]] = field(default_factory=list)
    dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="rlmq-sentinel-")))

    def url(self, db: int = 0) -> str:
        parts = [f"sentinel://{f':{self.password}@' if n == 0 else ''}127.0.0.1:{port}"
                 for n, (port, _) in enumerate(self.sentinels)]
        return ";".join(parts) + f"/{db}?master_name={MASTER_NAME}&sentinel_password={self.sentinel_password}"

    def start(self, timeout: float = 30.0) -> LoopbackSentinel:
        primary = start_private_redis(password=self.password, appendonly=True)
        replica = start_private_redis(password=self.password, appendonly=True)
        self.servers = [primary, replica]
        for server in self.servers:  # a replica promoted later must reach the old primary too
            redis.Redis(port=server.port, password=self.password).config_set("masterauth", self.password)
        redis.Redis(port=replica.port, password=self.password).replicaof("127.0.0.1", primary.port)
        for _ in range(3):
            port = free_port()
            conf = sentinel_config(self.dir / f"sentinel-{port}.conf", bind="127.0.0.1", port=port, data=self.dir,
                                   primary=("127.0.0.1", primary.port), quorum=2, password=self.password,
                                   sentinel_password=self.sentinel_password, down_after_ms=1000,
                                   failover_timeout_ms=3000)
            log = open(self.dir / f"sentinel-{port}.log", "wb")  # noqa: SIM115 - the process owns it
            self.sentinels.append((port, subprocess.Popen([find_redis_server(), str(conf), "--sentinel"],
                                                          stdout=log, stderr=subprocess.STDOUT)))
        wait_until(lambda: all(self._view(port).get("num-other-sentinels") == 2 and
                               self._view(port).get("num-slaves") == 1 for port, _ in self.sentinels),
                   timeout, "every Sentinel seeing the replica and the other two")
        return self

    def _sentinel(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, password=self.sentinel_password, socket_timeout=2, decode_responses=True)

    def _view(self, port: int) -> dict[str, Any]:
        try:
            return cast(dict[str, Any], self._sentinel(port).sentinel_master(MASTER_NAME))
        except redis.RedisError:
            return {}

    def primary_port(self) -> int:
        address = cast(tuple[str, int], self._sentinel(self.sentinels[0][0]).sentinel_get_master_addr_by_name(MASTER_NAME))
        return int(address[1])

    def failover(self, timeout: float = 60.0) -> int:
        """Promote the replica (``SENTINEL FAILOVER``); the new primary's port once all agree. Asked again
        until it happens: right after a failover the Sentinels refuse another (``failover-timeout``) and
        need a few seconds to see the old primary back as an in-sync replica."""
        old = self.primary_port()
        asked = 0.0

        def moved() -> bool:
            nonlocal asked
            views = [self._view(port) for port, _ in self.sentinels]
            if all(int(view.get("port", old)) != old for view in views):
                return True
            busy = any("failover" in str(view.get("flags", "")) for view in views)
            if not busy and int(views[0].get("port", old)) == old and time.monotonic() - asked > 10:
                try:  # once at a time: a second FAILOVER while the first settles would flip it back
                    self._sentinel(self.sentinels[0][0]).execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
                    asked = time.monotonic()
                except redis.ResponseError:
                    pass  # INPROG or NOGOODSLAVE: not yet
            return False

        wait_until(moved, timeout, "the Sentinels naming a new primary", interval=0.5)
        return self.primary_port()

    def kill_primary(self, timeout: float = 60.0) -> int:
        """SIGKILL the primary, as losing its host would; the promoted replica's port once all agree."""
        old = self.primary_port()
        next(server for server in self.servers if server.port == old).process.kill()
        wait_until(lambda: all(int(self._view(port).get("port", old)) != old for port, _ in self.sentinels),
                   timeout, "the Sentinels naming a new primary", interval=0.5)
        return self.primary_port()

    def stop(self) -> None:
        for _, process in self.sentinels:
            process.kill()
            process.wait(10)
        for server in self.servers:
            server.stop()
        self.sentinels.clear()
        self.servers.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LoopbackSentinel:
        try:
            return self.start()
        except BaseException:  # a start that timed out must not leave its servers and Sentinels running
            self.stop()
            raise

    def __exit__(self, *_: object) -> None:
        self.stop()
