"""The retry policy of every rlmq Redis client: an outage is waited out, a refused password is not.

redis-py counts ``AuthenticationError`` (and ``AuthorizationError``, an ACL's NOPERM) as a
``ConnectionError``, so a policy that retries connection errors asked a wrong password again for its
whole budget: three seconds before the CLI said "refused the password", two minutes in a worker. A
password does not become right by waiting. (redis-py 8.2's ``is_retryable`` says the same, but rlmq
supports older redis-py.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from redis.exceptions import AuthenticationError, AuthorizationError
from redis.retry import Retry

__all__ = ["OutageRetry"]

_T = TypeVar("_T")


class _Refused(Exception):
    """Carries a refusal past ``Retry``'s handler for connection errors."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class OutageRetry(Retry):
    """:class:`redis.retry.Retry` that raises an authentication or authorization error at once."""

    def call_with_retry(self, do: Callable[[], _T], fail: Callable[..., Any], *args: Any, **kwargs: Any) -> _T:
        def refused_at_once() -> _T:
            try:
                return do()
            except (AuthenticationError, AuthorizationError) as error:
                raise _Refused(error) from error

        try:
            return super().call_with_retry(refused_at_once, fail, *args, **kwargs)
        except _Refused as refused:
            raise refused.error from None
