"""The worker runtime: the run engine, the fan-out, sub-call answering (cache, rate limiter, LM
client), sandbox leases and reaping. Celery's task functions (``tasks``) call into it."""

__all__: list[str] = []
