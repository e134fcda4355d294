"""Sub-calls survive a dead llm worker: SIGKILL one of two llm workers mid-batch and every prompt
still gets its real answer, soon (its sub-tasks are sent again once the worker's heartbeat expires,
not after the broker's one-hour visibility timeout), and the step's own code timeout does not count
the time the step waits on the fleet.

Real Redis, real worker processes (one rlm, two llm), a local sandbox, the stub LLM over HTTP.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from rlmq.celery_config import LLM_QUEUE, client_app
from rlmq.local_redis import PrivateRedis, start_private_redis
from rlmq.settings import Settings
from rlmq.store.records import RunStatus
from tests.support.fleet import Fleet, fleet_fixture
from tests.support.records import stored_result
from tests.support.reliability import WORKER_ENV, batch_step, sub_requests, submit, wait_status
from tests.support.stub_llm import StubLLM, default_responder
from tests.support.wait import wait_until
from workers.fanout import Fanout, plan_chunks
from workers.usage import RunUsage

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fresh_stub")]


fleet = fleet_fixture(env=WORKER_ENV, workers=[("rlm", "rlm1", 1), ("llm", "llmA", 4), ("llm", "llmB", 4)],
                      timeout=180)


def test_killed_llm_worker_mid_batch_loses_no_prompt(fleet: Fleet, stub: StubLLM, r) -> None:
    stub.latency = 0.5  # 40 prompts on 8 threads: the batch takes several seconds
    # A 5-s code timeout per step: the batch (and the recovery from the kill) takes longer, but that
    # is time spent waiting on a host tool, which the step clock does not count.
    run_id, _ = submit(r, stub, ["print(items)", batch_step(40), "SUBMIT(answers=answers)"],
                       options={"execution_timeout": 5}, tag="llm-kill")
    wait_until(lambda: sub_requests(stub) >= 6, 60, "the batch under way")
    victim = next(w for w in fleet.workers if w.name.startswith("llmA"))
    fleet.kill(victim)
    killed_at = time.monotonic()

    record = wait_status(r, run_id, timeout=120)  # far below the defaults (300 s step, 1200 s gather)
    print(f"\nMEASURED kill llm worker: run succeeded {time.monotonic() - killed_at:.1f}s after the kill, "
          f"{record.progress.subtasks_resent} sub-task(s) resent")
    assert record.status is RunStatus.SUCCEEDED, (record.error, record.error_detail)
    answers = stored_result(r, run_id)["outputs"]["answers"]
    assert answers == [f"answer-{i}" for i in range(40)]  # no [ERROR], no timeout
    progress = record.progress
    assert progress.subtasks_resent >= 1 and progress.llm_errors == 0, progress
    fleet.workers.remove(victim)


def test_sub_tasks_lost_from_the_queue_are_sent_again(stub: StubLLM) -> None:
    """A failover can lose queued messages: a BRPOP pops one for a consumer whose connection then breaks,
    and a replica promoted before it had the last writes never had it. Nobody holds such a sub-task, so
    the dead-worker check cannot find it; the gather sends again what is neither queued nor held at two
    checks in a row, instead of waiting out RLMQ_GATHER_TIMEOUT (set to 300 s here)."""
    server = start_private_redis()
    try:
        r = redis.Redis.from_url(server.url)
        with Fleet(server.url, {**WORKER_ENV, "RLMQ_LM_API_BASE": stub.api_base, "RLMQ_GATHER_TIMEOUT": "300"}) as own:
            own.start("rlm", name="lost-rlm", concurrency=1)  # no llm worker yet: the sub-tasks wait in the queue
            run_id, _ = submit(r, stub, [batch_step(24), "SUBMIT(answers=answers)"], tag="lost-msgs")
            wait_until(lambda: r.llen(LLM_QUEUE) > 0, 60, "the batch's sub-tasks queued")
            time.sleep(1.0)  # the group is sent at once: all of it is queued by now
            queued = r.llen(LLM_QUEUE)
            r.delete(LLM_QUEUE)  # lost, as in a failover
            own.start("llm", name="lost-llm", concurrency=4)
            record = wait_status(r, run_id, timeout=90)
            assert record.status is RunStatus.SUCCEEDED, (record.status, record.error)
            assert stored_result(r, run_id)["outputs"]["answers"] == [f"answer-{i}" for i in range(24)]
            assert record.progress.subtasks_resent == queued, (queued, record.progress)
    finally:
        server.stop()


class _RedisBouncedAtResend(RunUsage):
    """A run's fan-out observer that stops Redis as the gather has resent lost sub-tasks, just before it joins
    them, and starts it again on its data ``down_for`` seconds later (``back`` is set then)."""

    def __init__(self, server: PrivateRedis, down_for: float) -> None:
        super().__init__(root_model="openai/stub-root", sub_model="openai/stub-sub")
        self.server, self.down_for = server, down_for
        self.back = threading.Event()

    def resent(self, n: int) -> None:
        super().resent(n)
        if self.back.is_set() or self.subtasks_resent > n:
            return
        self.server.stop()  # SIGTERM: the AOF (with the resent messages) is written
        threading.Timer(self.down_for, self._restart).start()

    def _restart(self) -> None:
        old = self.server
        self.server = start_private_redis(old.port, dir=old.dir, appendonly=True, password=old.password)
        self.back.set()


def test_a_gather_rides_out_redis_going_away_as_it_joins_again(stub: StubLLM, tmp_path) -> None:
    """Celery's result backend reads the results' state when a gather joins (again) and raises at once when
    Redis is away (its client has no retries; only its pub/sub reconnects by itself). A gather joins again
    after it resends lost sub-tasks and after it reads stored answers, both common in a failover: that error
    came out of ``llm_query_batched`` into the sandbox code, so the step's output was the error, not the
    answers (issue #19 (c): the run then went on without its ``answers`` and failed). Now the gather waits
    for Redis and joins again."""
    server = start_private_redis(dir=str(tmp_path), appendonly=True)
    observer = _RedisBouncedAtResend(server, down_for=3.0)
    settings = Settings(redis_url=server.url, lm="openai/stub-root", sub_lm="openai/stub-sub",
                        lm_api_base=stub.api_base)
    prompts = [f"bounce {i}" for i in range(12)]
    try:
        r = redis.Redis.from_url(server.url)
        fanout = Fanout(settings, app=client_app(server.url), observer=observer)
        with ThreadPoolExecutor(1) as pool:
            batch = pool.submit(fanout.query, prompts)  # no llm worker yet: its sub-tasks wait in the queue
            wait_until(lambda: r.llen(LLM_QUEUE) > 0, 30, "the batch's sub-tasks queued")
            time.sleep(0.5)  # the group is sent at once: all of it is queued by now
            r.delete(LLM_QUEUE)  # lost, as in a failover: the gather resends them, then Redis goes away
            assert observer.back.wait(30), "the gather never resent its lost sub-tasks"
            with Fleet(server.url, {**WORKER_ENV, "RLMQ_LM_API_BASE": stub.api_base}) as own:
                own.start("llm", name="bounce-llm", concurrency=4)
                answers = batch.result(timeout=60)
        assert [a.text for a in answers] == [default_responder([{"role": "user", "content": p}], {}) for p in prompts]
        sub_tasks = len(plan_chunks(len(prompts), settings.chunk_size, settings.fanout_width))
        assert observer.subtasks_resent == sub_tasks, (observer.subtasks_resent, sub_tasks)  # each lost one, once
    finally:
        observer.server.stop()
