"""The rating page and its JSON API, as a WSGI application served by the standard library (no web framework).

    GET  /                        the rating page (page.html)
    GET  /api/next?rater=NAME     {"token", "prompt", "left", "right"} (image URLs), or {"done": true}
    GET  /image/TOKEN/left|right  the image of one side of a comparison
    POST /api/vote                JSON {"token", "rater", "choice": "left"|"right"|"tie"} -> {"ok": true, "votes": n}
    GET  /api/results             win rates, Wilson intervals and Bradley–Terry strengths

Errors are JSON {"error": message} with status 400 (malformed), 404 (unknown), 405, 409 (duplicate vote) or 413.
"""
import json
import mimetypes
import random
import re
import threading
from pathlib import Path
from socketserver import ThreadingMixIn
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from .stats import bradley_terry, win_rates
from .store import Store, VoteError, outcome

PAGE = Path(__file__).with_name("page.html")
MAX_BODY_BYTES = 10_000
MAX_RATER_LENGTH = 100
# Seconds a connection may stay silent while its request or body is being read: a client that announces more bytes
# than it sends (or never finishes its headers) gives its thread back after this instead of holding it forever.
READ_TIMEOUT_SECONDS = 10
IMAGE_ROUTE = re.compile(r"^/image/([A-Za-z0-9_-]+)/(left|right)$")


def results(store: Store) -> dict:
    """Per-model win rates (with 95 % Wilson intervals) and Bradley–Terry log-strengths over all votes so far."""
    votes = store.votes()
    outcomes = [outcome(v) for v in votes]
    strengths = bradley_terry(outcomes, store.models())
    rates = win_rates(outcomes)
    return {"votes": len(votes), "raters": len({v["rater"] for v in votes}),
            "models": {model: {**rates.get(model, {"comparisons": 0}), "bradley_terry": strengths[model]}
                       for model in strengths}}


class HumanEvalApp:
    def __init__(self, store: Store, seed: int | None = None):
        self.store = store
        self.rng = random.Random(seed)
        self.rng_lock = threading.Lock()  # random.Random is not safe to share between request threads

    def __call__(self, environ, start_response):
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "/")
        try:
            if path == "/api/vote":
                if method != "POST":
                    raise VoteError("use POST to submit a vote", 405)
                status, body, content_type = 200, self.vote(environ), "application/json"
            elif method != "GET":
                raise VoteError(f"{method} is not supported here", 405)
            elif path == "/":
                status, body, content_type = 200, PAGE.read_bytes(), "text/html; charset=utf-8"
            elif path == "/api/next":
                status, body, content_type = 200, self.next(environ), "application/json"
            elif path == "/api/results":
                status, body, content_type = 200, _json(results(self.store)), "application/json"
            elif match := IMAGE_ROUTE.match(path):
                status, body, content_type = 200, *self.image(*match.groups())
            else:
                raise VoteError(f"no page at {path}", 404)
        except VoteError as error:
            status, body, content_type = error.status, _json({"error": str(error)}), "application/json"
        reasons = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
                   413: "Content Too Large"}
        start_response(f"{status} {reasons[status]}", [("Content-Type", content_type),
                                                       ("Content-Length", str(len(body))),
                                                       ("Cache-Control", "no-store")])
        return [body]

    def next(self, environ) -> bytes:
        rater = _rater(parse_qs(environ.get("QUERY_STRING", "")).get("rater", [""])[0])
        with self.rng_lock:
            seed = self.rng.getrandbits(64)
        task = self.store.next_task(rater, random.Random(seed))
        if task is None:
            return _json({"done": True})
        return _json({"token": task.token, "prompt": task.prompt,
                      "left": f"/image/{task.token}/left", "right": f"/image/{task.token}/right"})

    def image(self, token: str, side: str) -> tuple[bytes, str]:
        path = self.store.task_image(token, side)
        if path is None:
            raise VoteError("unknown comparison token", 404)
        try:
            data = Path(path).read_bytes()
        except OSError:
            raise VoteError(f"the image file of this comparison is gone ({Path(path).name})", 404) from None
        return data, mimetypes.guess_type(path)[0] or "application/octet-stream"

    def vote(self, environ) -> bytes:
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            raise VoteError("Content-Length is not a number") from None
        if length < 0:
            raise VoteError(f"Content-Length must be the body's size in bytes, got {length}")
        if length > MAX_BODY_BYTES:
            raise VoteError(f"a vote is a small JSON object; got {length} bytes", 413)
        try:
            body = environ["wsgi.input"].read(length)
        except OSError:  # TimeoutError after READ_TIMEOUT_SECONDS of silence, or the connection dropped
            body = b""
        if len(body) < length:
            raise VoteError(f"the body ended after {len(body)} of the {length} bytes Content-Length announced")
        try:
            submission = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            # RecursionError: brackets nested deeper than the decoder's stack (a vote has none).
            raise VoteError('the body must be JSON: {"token": ..., "rater": ..., "choice": "left"|"right"|"tie"}') \
                from None
        if not isinstance(submission, dict):
            raise VoteError("the body must be a JSON object with token, rater and choice")
        missing = [key for key in ("token", "rater", "choice") if not isinstance(submission.get(key), str)]
        if missing:
            raise VoteError(f"missing or non-string field(s): {', '.join(missing)}")
        count = self.store.record_vote(submission["token"], _rater(submission["rater"]), submission["choice"])
        return _json({"ok": True, "votes": count})


def _rater(value: str) -> str:
    rater = value.strip()
    if not rater or len(rater) > MAX_RATER_LENGTH:
        raise VoteError(f"a rater id of 1 to {MAX_RATER_LENGTH} characters is required")
    return rater


def _json(value) -> bytes:
    return json.dumps(value).encode("utf-8")


class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a hung browser connection must not keep the process alive at shutdown


class QuietHandler(WSGIRequestHandler):
    timeout = READ_TIMEOUT_SECONDS  # socketserver sets it on the connection's socket

    def log_message(self, format, *args):  # noqa: A002 (the base class's parameter name)
        pass  # one line per request on stderr would drown the server's own messages


def make_app_server(store: Store, host: str = "127.0.0.1", port: int = 8765, seed: int | None = None):
    """A ready, not yet serving, threaded HTTP server for the study (port 0 picks a free port)."""
    return make_server(host, port, HumanEvalApp(store, seed), server_class=ThreadingWSGIServer,
                       handler_class=QuietHandler)
