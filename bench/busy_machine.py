"""CI on a busy machine: `.ci/run` in a clean clone while the machine holds a large /tmp tree and
another rlmq stack works on a run.

    python bench/busy_machine.py                 # 2 GB in 100,000 files under /tmp, another stack, then CI
    python bench/busy_machine.py --files 1000 --size-mb 20 --no-ci   # only set the machine up, then wait

The suite must not depend on what else the machine holds or runs (the sandbox attack walks keep a
time budget; checks of sandboxes and processes are scoped to what each test started). This script
makes the machine busy the way a developer's machine is after a day of benchmarks, runs CI as CI
runs it (`git clone` of HEAD, `CI=true bash .ci/run`), prints its last lines and exit code, and
cleans up the tree and the other stack whatever happens.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.stub_llm import ScriptedRoot, StubLLM, route  # noqa: E402

# The other stack's run: a step that works for longer than CI takes, so it stays in progress.
BUSY_ROOT = ScriptedRoot(["import time\nwhile True:\n    time.sleep(1)"] * 20)


def fill_tmp(root: Path, files: int, size_mb: int) -> None:
    chunk = os.urandom(max(1, size_mb * 1024 * 1024 // files))
    per_dir = 1000
    for n in range(files):
        directory = root / f"d{n // per_dir:04d}"
        if n % per_dir == 0:
            directory.mkdir(parents=True, exist_ok=True)
        (directory / f"f{n % per_dir:04d}.bin").write_bytes(chunk)


def start_other_stack(workdir: Path, stub: StubLLM) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RLMQ_", "REDIS_URL"))}
    env.update(RLMQ_STATE_DIR=str(workdir / "state"), RLMQ_LM="openai/busy-root", RLMQ_SUB_LM="openai/busy-sub",
               RLMQ_LM_API_BASE=stub.api_base, OPENAI_API_KEY="busy-key", LITELLM_LOCAL_MODEL_COST_MAP="True",
               PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    with open(workdir / "up.log", "w") as log:  # the child has its own copy of the descriptor
        up = subprocess.Popen([sys.executable, "-m", "rlmq.cli", "up", "--no-flower"], env=env, cwd=workdir,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while "Ctrl-C stops everything" not in (workdir / "up.log").read_text():
        if up.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the other stack did not come up:\n" + (workdir / "up.log").read_text()[-3000:])
        time.sleep(0.5)
    submitted = subprocess.run([sys.executable, "-m", "rlmq.cli", "submit", "--signature", "question -> answer",
                                "--input", "question=keep the machine busy"], env=env, cwd=workdir,
                               capture_output=True, text=True, timeout=120)
    if submitted.returncode != 0:
        raise SystemExit(f"the other stack refused a run: {submitted.stderr}")
    run_id = submitted.stdout.strip()
    deadline = time.monotonic() + 120
    while True:
        status = subprocess.run([sys.executable, "-m", "rlmq.cli", "status", run_id], env=env, cwd=workdir,
                                capture_output=True, text=True, timeout=60).stdout
        if "running" in status:
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"the other stack's run never started: {status}")
        time.sleep(1)
    print(f"other stack: rlmq up (pid {up.pid}) with run {run_id} in progress", flush=True)
    return up


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--size-mb", type=int, default=2048)
    parser.add_argument("--no-ci", action="store_true", help="set the machine up, then wait for Ctrl-C")
    parser.add_argument("--log", default="busy-machine-ci.log", help="where CI's whole output goes")
    args = parser.parse_args()

    tree = Path(tempfile.mkdtemp(prefix="rlmq-busy-tree-", dir="/tmp"))
    work = Path(tempfile.mkdtemp(prefix="rlmq-busy-"))
    up = None
    started = time.monotonic()
    try:
        fill_tmp(tree, args.files, args.size_mb)
        print(f"/tmp tree: {args.files:,} files, {args.size_mb:,} MB in {tree} "
              f"({time.monotonic() - started:.0f} s)", flush=True)
        with StubLLM() as stub:
            stub.set_responder(route(root=BUSY_ROOT, sub=lambda prompt: "busy"))
            up = start_other_stack(work, stub)
            if args.no_ci:
                print("machine is busy; Ctrl-C to clean up", flush=True)
                signal.sigwait({signal.SIGINT, signal.SIGTERM})
                return 0
            clone = work / "clone"
            subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
            ci_started = time.monotonic()
            ci = subprocess.run(["bash", ".ci/run"], cwd=clone, env={**os.environ, "CI": "true"},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            Path(args.log).write_text(ci.stdout)
            print("\n".join(ci.stdout.splitlines()[-25:]))
            print(f"CI's whole output: {Path(args.log).resolve()}")
            print(f"\n.ci/run exit code {ci.returncode} after {time.monotonic() - ci_started:.0f} s "
                  f"(busy machine: {args.files:,} files under /tmp, another stack running)", flush=True)
            return ci.returncode
    finally:
        if up is not None:
            os.killpg(up.pid, signal.SIGINT)
            try:
                up.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(up.pid, signal.SIGKILL)
        shutil.rmtree(tree, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
