"""The Celery face of rlmq: the app (``celery -A tasks worker -Q rlm|llm``) and its tasks.

Importing the package registers every task, so a worker started with ``-A tasks`` knows them.
"""

from tasks.app import LLM_QUEUE, RLM_QUEUE, app
from tasks import run as _run  # noqa: F401  (registers rlmq.run_rlm)
from tasks import subcalls as _subcalls  # noqa: F401  (registers rlmq.llm_batch)

__all__ = ["LLM_QUEUE", "RLM_QUEUE", "app"]
