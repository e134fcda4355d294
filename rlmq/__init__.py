"""rlmq: run DSPy Recursive Language Models over large corpora on a Celery fleet.

What a user imports and runs: the client (``from rlmq import Client``), the ``rlmq`` command, input
loading, the local stack (``rlmq up``) and the demo, plus the records both the client and the
workers read (settings, Redis keys, run records, blobs, the Celery names). Nothing here imports
the worker runtime (``workers``, ``tasks``), dspy or litellm.
"""

from rlmq.client import Client, ClientError, UnknownRun
from rlmq.store.records import RunRecord, RunStatus

__all__ = ["Client", "ClientError", "RunRecord", "RunStatus", "UnknownRun"]
