"""Takes the emulator's sandboxes down once the emulator ends, however it ends (SIGKILL included).

bwrap's ``--die-with-parent`` covers a started sandbox, but inside each sandbox bwrap's own init (pid 1
of its namespace) arms it only after its setup: an emulator that dies meanwhile (killed, or exiting
while a sandbox starts) leaves that init to run the agent, reparented to PID 1.

``python -m tests.support.daytona_emulator.janitor --watch PID --marker PATH`` (started by the emulator's
``Pool``) waits for PID to end, then SIGKILLs every process whose command line holds PATH (the
emulator's own ``/opt/daytona`` source, in the arguments of each of its bwraps) until none is left;
everything else in a sandbox dies with its init (its pid namespace ends). Then it removes each
``--remove`` directory, as the emulator's own close would have (sandbox homes, agents' sockets).
Stdlib only until then: it starts fast.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

from tests.support.hosts.janitor import kill_until_gone, wait_for_exit

__all__ = ["kill_marked"]


def marked(marker: str) -> list[int]:
    """Pids of the processes whose command line holds ``marker`` as one whole argument."""
    wanted = os.fsencode(marker)
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if wanted in (entry / "cmdline").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
    return found


def kill_marked(marker: str, timeout: float = 10.0) -> list[int]:
    """SIGKILL every process ``marked`` by ``marker`` until none is left; the pids still there at ``timeout``."""
    return kill_until_gone(lambda: marked(marker), timeout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--watch", type=int, required=True, help="the emulator's pid")
    parser.add_argument("--marker", required=True, help="an argument each of its bwraps carries")
    parser.add_argument("--remove", action="append", default=[], help="a directory to remove afterwards")
    args = parser.parse_args()
    wait_for_exit(args.watch)
    kill_marked(args.marker)
    from broker_bridge.backends.host_writes import remove_tree  # sandbox code may have locked its home

    for directory in args.remove:
        remove_tree(Path(directory))


if __name__ == "__main__":
    main()
