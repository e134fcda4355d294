"""Deleting Daytona sandboxes: one (retried, bounded), one by rlmq's name, or every one carrying labels
(a run's orphans). Reapers reach the sandbox's own API and region (``SandboxInfo.provider``), not
only this process's environment; the key is always this process's own."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from tenacity import Retrying, retry_if_exception, stop_after_attempt, stop_after_delay, wait_exponential

from broker_bridge.backends.base import SandboxError
from broker_bridge.backends.daytona.client import daytona_client, error_message, is_celery_time_limit
from broker_bridge.backends.daytona.options import SANDBOX_LABEL

if TYPE_CHECKING:
    import daytona

__all__ = ["delete_daytona_sandbox", "delete_sandbox", "reap_daytona_sandboxes"]

log = logging.getLogger(__name__)

DELETE_BUDGET = 60.0  # seconds one sandbox's deletion may be retried for
ATTEMPT_TIMEOUT = 15.0  # seconds one delete request may take
LOOKUP_TIMEOUT = 30.0  # seconds a get or a page of a list may take


def _worth_retrying(exc: BaseException) -> bool:
    from daytona import DaytonaAuthenticationError, DaytonaForbiddenError

    return not (is_celery_time_limit(exc) or isinstance(exc, (DaytonaAuthenticationError, DaytonaForbiddenError)))


def delete_sandbox(sandbox: daytona.Sandbox, *, budget: float = DELETE_BUDGET) -> bool:
    """Delete one SDK sandbox; already gone counts as done. Transient errors are retried (delete is
    idempotent) for at most ``budget`` seconds; False if it could not be deleted."""
    from daytona import DaytonaNotFoundError

    retrying = Retrying(stop=stop_after_delay(budget) | stop_after_attempt(5),
                        wait=wait_exponential(multiplier=0.5, max=8), retry=retry_if_exception(_worth_retrying),
                        reraise=True)
    try:
        for attempt in retrying:
            with attempt:
                try:
                    sandbox.delete(timeout=min(ATTEMPT_TIMEOUT, max(1.0, budget)))
                except DaytonaNotFoundError:
                    pass
    except Exception as exc:
        if is_celery_time_limit(exc):
            raise
        log.error("could not delete Daytona sandbox %s: %s", getattr(sandbox, "id", "?"), error_message(exc))
        return False
    return True


def _client(client: daytona.Daytona | None, api_url: str | None, target: str | None) -> daytona.Daytona:
    return client or daytona_client(api_url=api_url, target=target)


def reap_daytona_sandboxes(labels: dict[str, str], *, client: daytona.Daytona | None = None, api_url: str | None = None,
                           target: str | None = None) -> int:
    """Delete every sandbox carrying all of ``labels`` (e.g. ``{"rlmq.run": run_id}``: a run's orphans,
    including one whose create reply was lost); return how many were deleted."""
    from daytona import ListSandboxesQuery

    if not labels:
        raise ValueError("refusing to reap without labels: that would delete every sandbox")
    wanted = {str(k): str(v) for k, v in labels.items()}
    client = _client(client, api_url, target)
    found = list(client.list(ListSandboxesQuery(labels=wanted), request_timeout=LOOKUP_TIMEOUT))  # before deleting
    deleted = 0
    for sandbox in found:
        have = sandbox.labels or {}
        if any(have.get(k) != v for k, v in wanted.items()):
            continue  # the server filter is trusted, but verified
        if str(getattr(sandbox, "state", "") or "").lower().endswith(("destroyed", "destroying")):
            continue
        deleted += delete_sandbox(sandbox)
    return deleted


def delete_daytona_sandbox(sandbox_id: str, *, client: daytona.Daytona | None = None, api_url: str | None = None,
                           target: str | None = None) -> bool:
    """Delete the sandbox rlmq created for ``sandbox_id`` (its name and label); False if none."""
    from daytona import DaytonaNotFoundError

    client = _client(client, api_url, target)
    try:
        sandbox = client.get(sandbox_id, request_timeout=LOOKUP_TIMEOUT)
    except DaytonaNotFoundError:
        return reap_daytona_sandboxes({SANDBOX_LABEL: sandbox_id}, client=client) > 0
    if (sandbox.labels or {}).get(SANDBOX_LABEL) != sandbox_id:
        raise SandboxError(f"Daytona sandbox {sandbox_id!r} exists but was not created by rlmq; not deleting it")
    return delete_sandbox(sandbox)
