"""Celery reads JSON only, in every process rlmq builds: workers (tasks.app), the client's app,
the result backend, the control mailbox and event receivers (Flower's too: it runs tasks.app)."""

from __future__ import annotations

from pathlib import Path

import pytest
from kombu.exceptions import DecodeError

from rlmq.celery_config import client_app
from tests.support.pickles import hostile_pickles

JSON = {"application/json"}


def _apps(url: str):
    from tasks.app import app
    from tests.support.fleet import configure_app

    # Point the workers' app at the suite's Redis before touching its backend: Celery caches the
    # backend on first use, and the fleet tests that follow expect this very URL (configure_app).
    configure_app(url)
    return {"workers": app, "client": client_app(url)}


def test_every_celery_app_accepts_json_only(redis_url: str) -> None:
    apps = _apps(redis_url)
    for name, app in apps.items():
        assert list(app.conf.accept_content) == ["json"], name
        assert list(app.conf.result_accept_content) == ["json"], name
        assert app.backend.accept == JSON, name
        assert set(app.control.mailbox.accept) <= {"json", "application/json"}, name
        with app.connection_for_read() as conn:
            assert app.events.Receiver(conn, handlers={}).accept == {"json"}, name
    apps["client"].close()


def test_a_pickle_planted_as_a_task_result_is_not_loaded(redis_url: str, redis_client, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    app = client_app(redis_url)
    try:
        for i, planted in enumerate(hostile_pickles(marker)):
            task_id = f"planted-{i}"
            redis_client.set(app.backend.get_key_for_task(task_id), planted)
            with pytest.raises(DecodeError):  # the backend's fixed JSON content type
                app.AsyncResult(task_id).state  # noqa: B018
        assert not marker.exists()
    finally:
        app.close()
