"""What a worker process needs at run time: settings, LM + cache, rate limiter, sandbox registry."""

__all__: list[str] = []
