"""For uid-65534 test processes, which run /usr/bin/python3 (3.11.2: the venv's interpreter lives
under /root, which they cannot enter). redis-py's asyncio module wants ``async_timeout`` below
3.11.3; the standard library's ``asyncio.timeout`` is what it uses from 3.11.3 on."""

from asyncio import timeout  # noqa: F401
