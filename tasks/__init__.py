"""The Celery face of rlmq: the app (``celery -A tasks worker -Q rlm|llm``, beat, flower) and its tasks.

Importing the package registers every task, so a worker started with ``-A tasks`` knows them.
The tasks are thin: the work is done in ``workers/``.
"""

from tasks import llm_batch as _llm_batch  # noqa: F401  (registers rlmq.llm_batch)
from tasks import reap_leases as _reap_leases  # noqa: F401  (registers rlmq.reap_leases)
from tasks import run_rlm as _run_rlm  # noqa: F401  (registers rlmq.run_rlm)
from tasks import watchdog as _watchdog  # noqa: F401  (heartbeat, sub-task marks, maintenance loop)
from tasks.app import app

__all__ = ["app"]
