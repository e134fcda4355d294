"""``rlmq ui``: a small Flask app with a page per run (it reads Redis; no dspy, no worker runtime).

- ``/``: recent runs with status, progress and cost;
- ``/run/<id>``: status and live progress (the batch in flight), usage and cost (root and
  sub-calls, paid and uncached), every finished step's reasoning, code and output with its
  sub-call statistics and timings, and the answer; it reloads itself every 2 s while the run works;
- ``/api/run/<id>``: the same as JSON;
- ``/jobs`` and ``/job/<id>``: corpus jobs (``rlmq.ui_jobs``).

Auth as Flower's: HTTP basic auth when ``basic_auth="user:password"`` is given (``rlmq ui``
takes ``--basic-auth`` or ``FLOWER_BASIC_AUTH``); the command binds to loopback unless told
otherwise, and refuses a non-loopback address without auth.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, abort, jsonify, render_template, request
from markupsafe import Markup, escape

from rlmq.progress import format_progress
from rlmq.store.records import RunStatus, Usage
from rlmq.trace import format_money, format_usage
from rlmq.ui_jobs import add_job_pages

if TYPE_CHECKING:
    from rlmq.client import Client

__all__ = ["create_app", "serve"]

REFRESH_SECONDS = 2


def _highlighter() -> tuple[Callable[[str], Markup], str]:
    try:
        from pygments import highlight
        from pygments.formatters import HtmlFormatter
        from pygments.lexers import PythonLexer
    except ImportError:
        return (lambda code: Markup("<pre class='code'>") + escape(code) + Markup("</pre>")), ""
    formatter = HtmlFormatter(cssclass="code", nowrap=False)
    lexer = PythonLexer()
    return (lambda code: Markup(highlight(code, lexer, formatter))), str(formatter.get_style_defs(".code"))


def create_app(client: Client, *, basic_auth: str | None = None) -> Flask:
    """The app over an ``rlmq.client.Client`` (its Redis holds every run, step and result)."""
    app = Flask(__name__)
    highlight, code_css = _highlighter()
    expected = basic_auth.encode() if basic_auth else None

    @app.before_request
    def _auth() -> Response | None:
        if expected is None:
            return None
        creds = request.authorization
        given = f"{creds.username}:{creds.password}".encode() if creds and creds.username is not None else b""
        if not hmac.compare_digest(given, expected):
            return Response("authentication required\n", 401, {"WWW-Authenticate": 'Basic realm="rlmq"'})
        return None

    def load(run_id: str) -> dict[str, Any]:
        from rlmq.client import ClientError, UnknownRun

        try:
            record = client.status(run_id)
        except UnknownRun:
            abort(404)
        except ClientError:
            abort(400)
        steps = client.trace(run_id)
        result = client.store.result(run_id) if record.status is RunStatus.SUCCEEDED else None
        return {"record": record, "steps": steps, "result": result}

    @app.get("/")
    def runs() -> str:
        records = client.list_runs(100)
        rows = [{"record": r, "line": format_progress(r), "cost": format_money(r.progress.usage.total.cost_paid)}
                for r in records]
        live = any(not r.status.finished for r in records)
        return render_template("runs.html", rows=rows, refresh=REFRESH_SECONDS if live else None)

    @app.get("/run/<run_id>")
    def run_page(run_id: str) -> str:
        data = load(run_id)
        record = data["record"]
        usage = record.progress.usage
        outputs = (data["result"] or {}).get("outputs")
        tree = client.tree(run_id)  # its child runs (rlm_query) and the tree's usage
        return render_template(
            "run.html", record=record, steps=data["steps"], line=format_progress(record),
            children=tree.children, tree_line=format_usage(tree.usage()) if tree.children else "",
            usage=usage, usage_line=format_usage(usage), money=format_money, highlight=highlight,
            code_css=code_css, batch=record.progress.batch, step_usage=Usage.from_json_dict,
            outputs=None if outputs is None else json.dumps(outputs, indent=2, ensure_ascii=False),
            refresh=None if record.status.finished else REFRESH_SECONDS)

    @app.get("/api/run/<run_id>")
    def run_api(run_id: str) -> Response:
        data = load(run_id)
        record = data["record"]
        return jsonify({"run": json.loads(record.to_json()), "steps": data["steps"], "result": data["result"]})

    add_job_pages(app, client, REFRESH_SECONDS)
    return app


def serve(app: Flask, host: str, port: int) -> None:
    """Serve until Ctrl-C (Werkzeug's threaded server: a handful of people look at run pages)."""
    from werkzeug.serving import make_server

    server = make_server(host, port, app, threaded=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
