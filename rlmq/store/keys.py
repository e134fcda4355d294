"""The one place that spells rlmq's Redis key names.

Every key starts with ``NAMESPACE`` (``rlmq``). Celery's own keys (``celery-task-meta-*``,
``_kombu.*``, queue lists) are Celery's business and are not listed here.

Schema (``{x}`` is an argument; ``digest`` is a sha256 hex digest):

==================================  ======  =================================================
key                                 type    holds
==================================  ======  =================================================
rlmq:blob:{digest}                  string  an input blob, stored once by content hash (or, past the chunk
                                            size, its manifest naming its chunks)
rlmq:blob-chunk:{digest}            string  one chunk of a large blob, by its own content hash
rlmq:run:{run_id}                   hash    the run record (spec, status, timestamps)
rlmq:run:{run_id}:owner             string  "{attempt}|{owner}" of the attempt running it (TTL = lease)
rlmq:run:{run_id}:result            string  the run's final result (JSON)
rlmq:run:{run_id}:cancel            string  present when a cancel was requested
rlmq:run:{run_id}:trajectory        list    one JSON entry per finished iteration, appended live
rlmq:run:{run_id}:children          zset    its child runs (rlm_query), scored by start time
rlmq:run:{root_id}:tree             hash    a tree's ledger: sub-calls and children reserved, its deadline,
                                            the reason it stopped (workers.tree_budget)
rlmq:run:{root_id}:tree-sandboxes   zset    a tree's live sandboxes: run id -> slot lease expiry
rlmq:run:{run_id}:sandbox-homes     set     where its sandboxes live: JSON {backend, provider} (no API key)
rlmq:runs                           zset    run ids scored by submit time (unix seconds)
rlmq:job:{job_id}                   hash    a corpus job: spec, status, cursor, counts per run status, usage sums
rlmq:job:{job_id}:items:{n}         list    the job's items n*ITEMS_PER_CHUNK.. (JSON each), a bounded chunk
rlmq:job:{job_id}:active            zset    the job's runs queued or running, scored by when they were fed
rlmq:job:{job_id}:retry             list    item indices to run again (``job resume --retry-failed``)
rlmq:job:{job_id}:unanswered        set     item indices whose latest run ended without an answer
rlmq:job:{job_id}:reruns            hash    item index -> its latest run id, when it is not the first one
rlmq:job:{job_id}:sampled           set     item indices a quote ran (the cursor skips them)
rlmq:jobs                           zset    job ids scored by submit time
rlmq:jobs:feeding                   set     jobs that still have items to feed or runs to settle
rlmq:runs:active                    zset    runs started or restarted, not finished (score: last change)
rlmq:worker:{hostname}              string  a live worker's heartbeat (TTL = RLMQ_WORKER_HEARTBEAT_TTL)
rlmq:sub:{task_id}                  string  hostname of the llm worker that received this sub-task
rlmq:resp:{digest}                  string  cached LM response (JSON), TTL
rlmq:resp:{digest}:inflight         string  single-flight lock: token of the computing worker
rlmq:resp:{digest}:done             list    wake-ups for single-flight waiters (BLPOP), TTL
rlmq:rate:{name}                    string  GCRA theoretical arrival time, requests bucket
rlmq:tpm:{name}                     string  GCRA theoretical arrival time, tokens bucket
rlmq:cooldown:{name}                string  fleet-wide pause (e.g. after a 429); PTTL = pause
rlmq:limit:{name}                   hash    the adaptive limiter's learned rate, bounds, mode
rlmq:slots:{name}                   zset    in-flight request leases scored by expiry (unix us)
rlmq:slots-free:{name}              list    wake-ups for callers waiting on a slot (BLPOP)
rlmq:lease:{sandbox_id}             record  a live sandbox's lease (run id, backend, expiry)
rlmq:leases                         zset    sandbox ids scored by lease expiry (unix seconds)
rlmq:dspy:{key}                     string  a dspy.cache entry (root-LM calls), TTL
rlmq:stats:{name}:{second}          string  fleet counter for one unix second (sub-calls,
                                            cache hits, 429s), TTL a few minutes
rlmq:metrics:{metric}               hash    a Prometheus counter's totals since the Redis began, one field
                                            per label set (a JSON list of label values; ``rlmq.store.metrics``)
==================================  ======  =================================================

Identifiers that sit in the middle of a key (run ids, digests, sandbox ids) may not contain
``:`` or whitespace, so ``run_key("a:owner")`` can never alias ``run_owner_key("a")``.
Names at the end of a key (rate-limit and cooldown names, often LiteLLM model strings such as
``ollama_chat/llama3:8b``) may contain ``:`` because their prefixes are unique.
"""

from __future__ import annotations

import re

__all__ = [
    "NAMESPACE",
    "blob_chunk_key",
    "blob_key",
    "cooldown_key",
    "dspy_cache_key",
    "inflight_done_key",
    "inflight_key",
    "job_active_key",
    "job_items_key",
    "job_key",
    "job_reruns_key",
    "job_retry_key",
    "job_sampled_key",
    "job_unanswered_key",
    "jobs_feeding_key",
    "jobs_index_key",
    "lease_key",
    "leases_index_key",
    "limit_state_key",
    "metric_key",
    "rate_limit_key",
    "rate_limit_tokens_key",
    "response_cache_key",
    "run_cancel_key",
    "run_children_key",
    "run_key",
    "run_owner_key",
    "run_result_key",
    "run_sandbox_homes_key",
    "run_trajectory_key",
    "runs_active_key",
    "runs_index_key",
    "runs_queued_key",
    "slots_free_key",
    "slots_key",
    "stats_key",
    "subtask_holder_key",
    "tree_key",
    "tree_sandboxes_key",
    "worker_heartbeat_key",
]

NAMESPACE = "rlmq"


# One regex search instead of a Python loop per character: keys are built for every sub-call.
_COLON_OR_SPACE = re.compile(r"[:\s]")
_SPACE = re.compile(r"\s")


def _ident(value: str) -> str:
    """An identifier that sits inside a key: non-empty, no ':' and no whitespace."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"key part must be a non-empty string, got {value!r}")
    if _COLON_OR_SPACE.search(value):
        raise ValueError(f"key part may not contain ':' or whitespace: {value!r}")
    return value


def _name(value: str) -> str:
    """A name at the end of a key: non-empty and without whitespace (':' is allowed)."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"key name must be a non-empty string, got {value!r}")
    if _SPACE.search(value):
        raise ValueError(f"key name may not contain whitespace: {value!r}")
    return value


def blob_key(digest: str) -> str:
    return f"{NAMESPACE}:blob:{_ident(digest)}"


def blob_chunk_key(digest: str) -> str:
    return f"{NAMESPACE}:blob-chunk:{_ident(digest)}"


def run_key(run_id: str) -> str:
    return f"{NAMESPACE}:run:{_ident(run_id)}"


def run_owner_key(run_id: str) -> str:
    return f"{run_key(run_id)}:owner"


def run_result_key(run_id: str) -> str:
    return f"{run_key(run_id)}:result"


def run_cancel_key(run_id: str) -> str:
    return f"{run_key(run_id)}:cancel"


def run_children_key(run_id: str) -> str:
    return f"{run_key(run_id)}:children"


def tree_key(root_id: str) -> str:
    return f"{run_key(root_id)}:tree"


def tree_sandboxes_key(root_id: str) -> str:
    return f"{run_key(root_id)}:tree-sandboxes"


def run_sandbox_homes_key(run_id: str) -> str:
    return f"{run_key(run_id)}:sandbox-homes"


def run_trajectory_key(run_id: str) -> str:
    return f"{run_key(run_id)}:trajectory"


def stats_key(name: str, second: int) -> str:
    return f"{NAMESPACE}:stats:{_ident(name)}:{int(second)}"


def metric_key(metric: str) -> str:
    return f"{NAMESPACE}:metrics:{_ident(metric)}"


def runs_index_key() -> str:
    return f"{NAMESPACE}:runs"


def runs_active_key() -> str:
    return f"{NAMESPACE}:runs:active"


def runs_queued_key() -> str:
    """Runs waiting for a worker, scored by when they were (last) sent: a run left QUEUED too long
    lost its message and is sent again (``workers.recovery.resend_queued``)."""
    return f"{NAMESPACE}:runs:queued"


def job_key(job_id: str) -> str:
    return f"{NAMESPACE}:job:{_ident(job_id)}"


def job_items_key(job_id: str, chunk: int) -> str:
    return f"{job_key(job_id)}:items:{int(chunk)}"


def job_active_key(job_id: str) -> str:
    return f"{job_key(job_id)}:active"


def job_retry_key(job_id: str) -> str:
    return f"{job_key(job_id)}:retry"


def job_sampled_key(job_id: str) -> str:
    return f"{job_key(job_id)}:sampled"


def job_unanswered_key(job_id: str) -> str:
    return f"{job_key(job_id)}:unanswered"


def job_reruns_key(job_id: str) -> str:
    return f"{job_key(job_id)}:reruns"


def jobs_index_key() -> str:
    return f"{NAMESPACE}:jobs"


def jobs_feeding_key() -> str:
    return f"{NAMESPACE}:jobs:feeding"


def worker_heartbeat_key(hostname: str) -> str:
    return f"{NAMESPACE}:worker:{_ident(hostname)}"


def worker_draining_key(hostname: str) -> str:
    """Set while a worker shuts down: its runs hand themselves back (``workers.drain``)."""
    return f"{NAMESPACE}:draining:{_ident(hostname)}"


def subtask_holder_key(task_id: str) -> str:
    return f"{NAMESPACE}:sub:{_ident(task_id)}"


def response_cache_key(digest: str) -> str:
    return f"{NAMESPACE}:resp:{_ident(digest)}"


def inflight_key(digest: str) -> str:
    return f"{response_cache_key(digest)}:inflight"


def inflight_done_key(digest: str) -> str:
    return f"{response_cache_key(digest)}:done"


def rate_limit_key(name: str) -> str:
    return f"{NAMESPACE}:rate:{_name(name)}"


def rate_limit_tokens_key(name: str) -> str:
    return f"{NAMESPACE}:tpm:{_name(name)}"


def cooldown_key(name: str) -> str:
    return f"{NAMESPACE}:cooldown:{_name(name)}"


def limit_state_key(name: str) -> str:
    return f"{NAMESPACE}:limit:{_name(name)}"


def slots_key(name: str) -> str:
    return f"{NAMESPACE}:slots:{_name(name)}"


def slots_free_key(name: str) -> str:
    return f"{NAMESPACE}:slots-free:{_name(name)}"


def lease_key(sandbox_id: str) -> str:
    return f"{NAMESPACE}:lease:{_ident(sandbox_id)}"


def leases_index_key() -> str:
    return f"{NAMESPACE}:leases"


def dspy_cache_key(key: str) -> str:
    return f"{NAMESPACE}:dspy:{_ident(key)}"
