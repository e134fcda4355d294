"""The local backend's persistent Python context (what Daytona's code interpreter is on Daytona).

Reads one JSON line per run on stdin (``{"code": ...}``), executes it in one namespace that lives
as long as the process, and answers ``{"ok": true}`` or ``{"ok": false, "error": ...}`` on a private
copy of stdout. File descriptors 1 and 2 point at /dev/null, so nothing sandbox code writes there can
corrupt the protocol; the runtime captures code output itself.
"""

from __future__ import annotations

import argparse
import builtins
import json
import os
import sys
import threading
from typing import TYPE_CHECKING, Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

if TYPE_CHECKING:  # the checker knows the package; in the sandbox, protocol.py is a sibling on sys.path
    from broker_bridge.sandbox import protocol
else:
    import protocol


def reap_children() -> None:
    """Collect exited children and orphans (we are their subreaper), as init would.

    Unreaped zombies would keep counting against the sandbox's process cap. A ``subprocess.Popen``
    from an earlier step that ended since then reads as exit code 0 afterwards: the price of that.
    """
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="rlmq local sandbox kernel")
    parser.add_argument("--limits", default="{}", help="JSON resource limits (see protocol.apply_limits)")
    parser.add_argument("--parent-pid", type=int)
    args = parser.parse_args(argv)
    protocol.apply_limits(json.loads(args.limits))
    protocol.become_subreaper()
    protocol.drop_privileges()

    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")  # os.dup: not inherited by children
    sink = os.open(os.devnull, os.O_WRONLY)
    os.dup2(sink, 1)
    os.dup2(sink, 2)
    os.close(sink)
    if args.parent_pid:
        threading.Thread(target=protocol.exit_with_parent, args=(args.parent_pid,), daemon=True).start()

    pid = os.getpid()
    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
    replies.write(json.dumps({"ready": True}) + "\n")
    replies.flush()
    for line in sys.stdin:
        try:
            code = json.loads(line)["code"]
            exec(compile(code, "<rlmq-driver>", "exec"), namespace)
            reply: dict[str, bool | str] = {"ok": True}
        except BaseException as exc:  # the runtime catches code errors; this is a broken driver
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        if os.getpid() != pid:
            os._exit(0)  # a fork made by sandbox code must not answer for the kernel
        reap_children()
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    main()
