"""One interpreter context inside an emulator sandbox (stdlib only): a Python process whose globals
live across runs. Reads ``{"code", "envs"}`` lines on stdin and writes JSON chunks on its real stdout:
``stdout``/``stderr`` text (flushed at a newline or 1024 characters, as Daytona's worker does, so one
huge write is one huge line), an ``error`` chunk for an exception, then ``control`` ``completed`` or
``interrupted`` (a SIGINT the code did not catch).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from types import FrameType
from typing import Any, NoReturn, TextIO

CHUNK = 1024


class Emitter:
    def __init__(self, out: TextIO, stream_type: str) -> None:
        self.out, self.stream_type = out, stream_type
        self.buffer: list[str] = []

    def write(self, data: object) -> int:
        if not isinstance(data, str):
            data = str(data)
        if data:
            self.buffer.append(data)
            if "\n" in data or sum(len(part) for part in self.buffer) >= CHUNK:
                self.flush()
        return len(data)

    def flush(self) -> None:
        if self.buffer:
            text, self.buffer = "".join(self.buffer), []
            emit(self.out, {"type": self.stream_type, "text": text})

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:
        return "utf-8"


def emit(out: TextIO, chunk: dict[str, Any]) -> None:
    try:
        out.write(json.dumps(chunk) + "\n")
        out.flush()
    except (OSError, ValueError):
        pass


def clean_traceback(exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == "<string>"]
    lines = ["Traceback (most recent call last):\n"] if frames else []
    lines += [f'  File "<stdin>", line {f.lineno}\n' + (f"    {f.line}\n" if f.line else "") for f in frames]
    return "".join(lines) + f"{type(exc).__name__}: {exc}\n"


def main() -> None:
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")  # the chunk pipe; fd 1 itself is left to the code
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}

    def interrupt(signum: int, frame: FrameType | None) -> NoReturn:
        raise KeyboardInterrupt("Execution interrupted")

    signal.signal(signal.SIGINT, interrupt)
    for line in sys.stdin:
        try:
            job = json.loads(line)
        except ValueError as exc:
            emit(out, {"type": "error", "name": "JSONDecodeError", "value": str(exc), "traceback": ""})
            continue
        stdout, stderr = Emitter(out, "stdout"), Emitter(out, "stderr")
        saved_env = {key: os.environ.get(key) for key in (job.get("envs") or {})}
        os.environ.update({str(k): str(v) for k, v in (job.get("envs") or {}).items()})
        control, error = "completed", None
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = stdout, stderr
        try:
            exec(compile(job.get("code") or "", "<string>", "exec"), namespace)
        except KeyboardInterrupt:
            control = "interrupted"
        except SystemExit:
            pass
        except BaseException as exc:
            error = {"type": "error", "name": type(exc).__name__, "value": str(exc), "traceback": clean_traceback(exc)}
        finally:
            sys.stdout, sys.stderr = saved
            stdout.flush()
            stderr.flush()
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        if error:
            emit(out, error)
        emit(out, {"type": "control", "text": control})


if __name__ == "__main__":
    main()
