"""The README's ACL recipe works: workers and submitters as separate Redis users without the
dangerous commands, a whole run through the fleet, and neither user can FLUSHALL or CONFIG."""

from __future__ import annotations

import pytest
import redis

from rlmq.client import Client
from rlmq.store.records import RunStatus
from tests.support.fleet import Fleet
from tests.support.stub_llm import ScriptedRoot, StubLLM, route

pytestmark = [pytest.mark.slow]

ROLES = {"rlmq-worker": "worker-pw-0123456789", "rlmq-submit": "submit-pw-0123456789"}
# the rules README.md shows
RULES = "on >{pw} ~* &* +@all -@dangerous +info"


def _url(server, user: str) -> str:
    return f"redis://{user}:{ROLES[user]}@127.0.0.1:{server.port}/2"  # its own db: its own queues


def test_a_run_with_one_acl_user_per_role(redis_server, stub_llm: StubLLM) -> None:
    admin = redis.Redis.from_url(redis_server.url)
    for user, pw in ROLES.items():
        admin.execute_command("ACL", "SETUSER", user, "reset", *RULES.format(pw=pw).split())
    try:
        for user in ROLES:
            as_user = redis.Redis.from_url(_url(redis_server, user))
            for command in (("FLUSHALL",), ("CONFIG", "GET", "*"), ("KEYS", "*"), ("ACL", "LIST")):
                with pytest.raises(redis.exceptions.NoPermissionError):
                    as_user.execute_command(*command)
            as_user.close()
        stub_llm.set_responder(route(root=ScriptedRoot(["SUBMIT(answer=llm_query('Who is the Count?'))"]),
                                     sub=lambda prompt: "Edmond Dantès"))
        env = {"RLMQ_LM": "openai/scripted-root", "RLMQ_SUB_LM": "openai/stub-sub",
               "RLMQ_LM_API_BASE": stub_llm.api_base}
        with Fleet(_url(redis_server, "rlmq-worker"), env) as fleet:
            workers = [fleet.start("rlm", name="acl-rlm", concurrency=1, wait=False),
                       fleet.start("llm", name="acl-llm", concurrency=2, wait=False)]
            fleet.wait_ready(workers, timeout=120)
            client = Client(_url(redis_server, "rlmq-submit"))
            run_id = client.submit("question -> answer", {"question": "who?"})
            record = client.wait(run_id, timeout=120)
            assert record.status is RunStatus.SUCCEEDED, record.error
            assert client.result(run_id)["outputs"]["answer"] == "Edmond Dantès"
            client.close()
            assert all(w.alive for w in fleet.workers), [w.log_tail(10) for w in fleet.workers]
    finally:
        for user in ROLES:
            admin.execute_command("ACL", "DELUSER", user)
        admin.close()
        own_db = redis.Redis.from_url(redis_server.url.rsplit("/", 1)[0] + "/2")
        own_db.flushdb()
        own_db.close()
