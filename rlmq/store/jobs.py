"""Corpus jobs in Redis: one signature, shared inputs, and many items, each answered by one run.

A job's record is a hash under ``keys.job_key``: its ``JobSpec`` (JSON), its status, how many items
are stored (``stored``) and, once the submitter has streamed them all, how many there are
(``total``); the feed cursor; a count per run status (``n:SUCCEEDED``...) and the sums of its runs'
usage (``u:cost_paid``...). Items are JSON lines in lists of at most ``ITEMS_PER_CHUNK``
(``keys.job_items_key``), so no Redis value grows with the job. An item is ``{"refs": {name: digest},
"inline": {name: value}}``: large values are blobs (``rlmq.store.blobs``) uploaded at submit, small
ones ride in the chunk and become blobs when their run is fed.

Item ``i``'s first run is ``{job_id}-{i}``; a retry in round ``r`` is ``{job_id}-{i}.r{r}``
(``keys.job_reruns_key`` names an item's latest run). Run ids are fixed by the job, the item and the
round, so feeding an item twice (a feeder that crashed after reserving) names the same run, and the
run's claim runs it once.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import Any

import redis

from rlmq.store import keys, replies
from rlmq.store.lua import lua_scripts
from rlmq.store.records import RunStatus

__all__ = ["ENDED_JOB_TTL_SECONDS", "ITEMS_PER_CHUNK", "USAGE_FIELDS", "JobRecord", "JobSpec", "JobStatus", "JobStore", "item_of_run",
           "new_job_id"]

ITEMS_PER_CHUNK = 1000
# An ended job's keys live as long as its runs' records (RLMQ_RESULT_EXPIRES, whose default this is;
# the workers pass their own): its results would read NOT_STARTED for every item once those were gone.
ENDED_JOB_TTL_SECONDS = 7 * 24 * 3600
# the run usage a job sums (keys of Usage.total's JSON, plus the root and sub-call counts)
USAGE_FIELDS = ("cost_paid", "cost_uncached", "calls", "cache_hits", "input_tokens", "output_tokens",
                "root_calls", "sub_calls", "seconds")


class JobStatus(str, Enum):
    QUOTING = "QUOTING"  # only its quote's sample runs; started by ``job start`` (rlmq.job_quote)
    SUBMITTING = "SUBMITTING"  # items are still being streamed in (runs are fed already)
    RUNNING = "RUNNING"
    DONE = "DONE"  # every item's run has ended (answered or not: see the counts)
    CANCELLED = "CANCELLED"
    STOPPED = "STOPPED"  # its max_cost was spent; the error says so

    @property
    def finished(self) -> bool:
        return self in (JobStatus.DONE, JobStatus.CANCELLED, JobStatus.STOPPED)


def new_job_id() -> str:
    return "job" + uuid.uuid4().hex[:20]


@dataclass(frozen=True)
class JobSpec:
    job_id: str
    signature: str
    shared: dict[str, str]  # input name -> blob digest, the same for every item
    item_fields: list[str]  # the inputs each item gives
    options: dict[str, Any] = field(default_factory=dict)  # run options, as RunSpec.options
    tools: list[str] = field(default_factory=list)
    max_active: int = 8
    max_cost: float | None = None  # dollars paid by all its runs; the job is STOPPED past it
    submitted_at: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(asdict(self), allow_nan=False)

    @classmethod
    def from_json(cls, data: str | bytes) -> JobSpec:
        raw = json.loads(data)
        return cls(job_id=str(raw["job_id"]), signature=str(raw["signature"]),
                   shared={str(k): str(v) for k, v in raw["shared"].items()},
                   item_fields=[str(f) for f in raw["item_fields"]], options=dict(raw.get("options") or {}),
                   tools=[str(t) for t in raw.get("tools") or []], max_active=int(raw.get("max_active") or 1),
                   max_cost=None if raw.get("max_cost") is None else float(raw["max_cost"]),
                   submitted_at=float(raw.get("submitted_at") or 0.0))


@dataclass
class JobRecord:
    spec: JobSpec
    status: JobStatus
    stored: int = 0
    total: int | None = None  # None while items are still being submitted
    cursor: int = 0  # items fed so far (first runs; retries come from the retry list)
    active: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # run status -> items whose latest run ended so
    usage: dict[str, float] = field(default_factory=dict)  # USAGE_FIELDS summed over every run of the job
    first_result_at: float | None = None
    finished_at: float | None = None
    error: str | None = None

    @property
    def settled(self) -> int:
        return sum(self.counts.values())

    def to_json_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["status"] = self.status.value
        return out


def item_of_run(job_id: str, run_id: str) -> int:
    """The item index in one of the job's run ids (``{job}-{i}`` or ``{job}-{i}.r{round}``)."""
    return int(run_id[len(job_id) + 1:].split(".", 1)[0])


class JobStore:
    """Job records, item chunks, and the job's Lua steps (reserve, settle, resume, end)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def create(self, spec: JobSpec, *, quoting: bool = False) -> None:
        pipe = self.redis.pipeline()
        status = JobStatus.QUOTING if quoting else JobStatus.SUBMITTING
        pipe.hset(keys.job_key(spec.job_id), mapping={
            "spec": spec.to_json(), "status": status.value, "stored": 0, "cursor": 0,
            "max_active": spec.max_active, "round": 0})
        pipe.zadd(keys.jobs_index_key(), {spec.job_id: spec.submitted_at})
        pipe.sadd(keys.jobs_feeding_key(), spec.job_id)
        pipe.execute()

    def append_items(self, job_id: str, first: int, items: Sequence[str]) -> None:
        """Store items ``first..`` (JSON lines, within one chunk) and make them feedable."""
        chunk = first // ITEMS_PER_CHUNK
        assert (first + len(items) - 1) // ITEMS_PER_CHUNK == chunk, "items cross a chunk"
        pipe = self.redis.pipeline()
        pipe.rpush(keys.job_items_key(job_id, chunk), *items)
        pipe.hset(keys.job_key(job_id), "stored", first + len(items))
        pipe.execute()

    def seal(self, job_id: str, total: int) -> None:
        """Every item is stored: the job may end once they are all answered (a QUOTING job stays so)."""
        self.redis.hset(keys.job_key(job_id), "total", total)
        if self.status(job_id) is JobStatus.SUBMITTING:
            self.redis.hset(keys.job_key(job_id), "status", JobStatus.RUNNING.value)

    def sample(self, job_id: str, indices: Sequence[int]) -> None:
        """Run these items first (a quote's sample): their first runs, which the job later reuses."""
        pipe = self.redis.pipeline()
        pipe.sadd(keys.job_sampled_key(job_id), *indices)
        pipe.rpush(keys.job_retry_key(job_id), *indices)
        pipe.execute()

    def sampled(self, job_id: str) -> list[int]:
        return sorted(int(replies.text(m)) for m in self.redis.smembers(keys.job_sampled_key(job_id)))

    def start(self, job_id: str, max_cost: float | None) -> bool:
        """A QUOTING job RUNNING (with ``max_cost`` as its budget); False if it was not QUOTING."""
        record = self.get(job_id)
        if record is None or record.status is not JobStatus.QUOTING:
            return False
        spec = replace(record.spec, max_cost=max_cost if max_cost is not None else record.spec.max_cost)
        self.redis.hset(keys.job_key(job_id), mapping={"spec": spec.to_json(), "status": JobStatus.RUNNING.value})
        return True

    def items(self, job_id: str, indices: Sequence[int]) -> list[dict[str, Any]]:
        pipe = self.redis.pipeline(transaction=False)
        for i in indices:
            pipe.lindex(keys.job_items_key(job_id, i // ITEMS_PER_CHUNK), i % ITEMS_PER_CHUNK)
        found = pipe.execute()
        missing = [i for i, raw in zip(indices, found, strict=True) if raw is None]
        if missing:
            raise LookupError(f"job {job_id} has lost item(s) {missing[:5]} (expired or evicted)")
        return [json.loads(raw) for raw in found]

    def get(self, job_id: str) -> JobRecord | None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(keys.job_key(job_id))
        pipe.zcard(keys.job_active_key(job_id))
        raw, active = pipe.execute()
        h = {replies.text(k): replies.text(v) for k, v in replies.raw_hash(raw).items()}
        if "spec" not in h:
            return None

        def num(name: str) -> float | None:
            return float(h[name]) if h.get(name) else None

        return JobRecord(
            spec=JobSpec.from_json(h["spec"]), status=JobStatus(h.get("status") or "RUNNING"),
            stored=int(h.get("stored") or 0), total=int(h["total"]) if h.get("total") else None,
            cursor=int(h.get("cursor") or 0), active=int(active),
            counts={k[2:]: int(v) for k, v in h.items() if k.startswith("n:") and int(v)},
            usage={name: float(h.get("u:" + name) or 0.0) for name in USAGE_FIELDS},
            first_result_at=num("first_result_at"), finished_at=num("finished_at"), error=h.get("error") or None)

    def status(self, job_id: str) -> JobStatus | None:
        raw = self.redis.hget(keys.job_key(job_id), "status")
        return JobStatus(replies.text(raw)) if raw else None

    def recent(self, limit: int = 50) -> list[str]:
        return replies.members(self.redis.zrevrange(keys.jobs_index_key(), 0, limit - 1))

    def feeding(self) -> list[str]:
        return replies.members(self.redis.smembers(keys.jobs_feeding_key()))

    def done_feeding(self, job_id: str, *, expire_seconds: int = ENDED_JOB_TTL_SECONDS) -> None:
        """Off the feeders' list; an ended job's keys then expire with its runs' records."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.srem(keys.jobs_feeding_key(), job_id)
        status = self.status(job_id)
        if status is not None and status.finished:
            for key in self._keys(job_id):
                pipe.expire(key, expire_seconds)
        pipe.execute()

    def _keys(self, job_id: str) -> list[str]:
        stored = int(self.redis.hget(keys.job_key(job_id), "stored") or 0)
        return [keys.job_key(job_id), keys.job_active_key(job_id), keys.job_retry_key(job_id),
                keys.job_sampled_key(job_id), keys.job_unanswered_key(job_id), keys.job_reruns_key(job_id),
                *(keys.job_items_key(job_id, n) for n in range(-(-stored // ITEMS_PER_CHUNK)))]

    def forget_missing(self, job_ids: Sequence[str]) -> None:
        """Take jobs whose record has expired off the index."""
        if job_ids:
            self.redis.zrem(keys.jobs_index_key(), *job_ids)

    def active_runs(self, job_id: str) -> list[tuple[str, float]]:
        """The job's runs queued or running, with when they were fed."""
        pairs: list[Any] = self.redis.zrange(keys.job_active_key(job_id), 0, -1, withscores=True)
        return [(replies.text(member), float(score)) for member, score in pairs]

    def latest_runs(self, job_id: str, indices: Sequence[int]) -> list[str]:
        """Each item's latest run id (its first, unless it was retried)."""
        reruns = self.redis.hmget(keys.job_reruns_key(job_id), [str(i) for i in indices]) if indices else []
        return [replies.text(r) if r else f"{job_id}-{i}" for i, r in zip(indices, reruns, strict=True)]

    def unanswered(self, job_id: str) -> dict[int, str]:
        raw = replies.raw_hash(self.redis.hgetall(keys.job_unanswered_key(job_id)))
        return {int(replies.text(k)): replies.text(v) for k, v in raw.items()}

    # -- the Lua steps ----------------------------------------------------------------------
    def reserve(self, job_id: str) -> list[tuple[str, int]]:
        """(run id, item index) of the runs to start now, within the job's max_active."""
        flat = lua_scripts("rlmq.store").run(
            self.redis, "job_reserve", [keys.job_key(job_id), keys.job_active_key(job_id), keys.job_retry_key(job_id),
                                        keys.job_reruns_key(job_id), keys.job_sampled_key(job_id)],
            {"job_id": job_id, "now": repr(time.time())})
        texts = [replies.text(x) for x in flat]
        return [(texts[i], int(texts[i + 1])) for i in range(0, len(texts), 2)]

    def settle(self, job_id: str, run_id: str, status: RunStatus, usage: dict[str, float]) -> bool:
        """Count a run's end in its job, once (False if it was counted already or is not the job's)."""
        return bool(lua_scripts("rlmq.store").run(
            self.redis, "job_settle", [keys.job_key(job_id), keys.job_active_key(job_id),
                                       keys.job_unanswered_key(job_id), keys.job_retry_key(job_id)],
            {"run_id": run_id, "index": str(item_of_run(job_id, run_id)), "status": status.value,
             "now": repr(time.time()), "usage": usage}))

    def resume(self, job_id: str, *, retry: bool) -> int:
        """RUNNING again; with ``retry``, the unanswered items queued for a new round. -1: still submitting."""
        n = int(lua_scripts("rlmq.store").run(
            self.redis, "job_resume", [keys.job_key(job_id), keys.job_unanswered_key(job_id),
                                       keys.job_retry_key(job_id)], {"retry": retry}))
        if n >= 0:
            pipe = self.redis.pipeline(transaction=False)
            for key in self._keys(job_id):  # running again: nothing of it may expire meanwhile
                pipe.persist(key)
            pipe.sadd(keys.jobs_feeding_key(), job_id)
            pipe.execute()
        return n

    def end(self, job_id: str, status: JobStatus, error: str) -> bool:
        """CANCELLED or STOPPED, unless the job has ended already."""
        return bool(lua_scripts("rlmq.store").run(self.redis, "job_end", [keys.job_key(job_id)],
                                                  {"status": status.value, "error": error, "now": repr(time.time())}))

    def scan_runs(self, job_id: str, total: int, batch: int = 500) -> Iterator[tuple[int, str]]:
        """(item index, latest run id) for every item, in item order, ``batch`` at a time."""
        for start in range(0, total, batch):
            indices = list(range(start, min(total, start + batch)))
            yield from zip(indices, self.latest_runs(job_id, indices), strict=True)
