"""The review page's server (the standard library's ThreadingHTTPServer: no web framework to install).

Routes (JSON in and out; the page is static/index.html + review.js + review.css):
  GET  /                          the page (raters are told apart by ?rater=NAME or a name typed in it)
  GET  /api/config                the questions, choices and the default rater (--rater)
  GET  /api/item?rater=NAME       the rater's first comparison not fully answered (with the answers it
                                  already has, so a reload shows them) and the rater's progress
  POST /api/answer                {rater, n, question, choice}: appended to answers.jsonl (on disk before
                                  the reply), as the row `answers.answer_row` builds
  GET  /image?rater=&n=&side=&k=  the k-th seed's PNG of the system shown on `side` of comparison n,
                                  read from its sample folder (anonymised: no system name or folder in
                                  any URL the page sees)
The server keeps no state but the answers file: a restarted server continues where each rater stopped.
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from dpdmd_jax.human.answers import AnswerFile, answer_row
from dpdmd_jax.human.study import CHOICES, QUESTIONS, Item, ReviewError, Study, check_rater, record, schedule

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8"}
MAX_BODY = 4096  # an answer is a few dozen bytes


class Review:
    """The study, the answers file and each rater's schedule (computed once per rater)."""

    def __init__(self, study: Study, answers: AnswerFile, seed: int = 0, default_rater: str | None = None):
        self.study, self.answers, self.seed, self.default_rater = study, answers, seed, default_rater
        self._schedules: dict[str, list[Item]] = {}
        self._lock = threading.Lock()

    def schedule(self, rater: str) -> list[Item]:
        with self._lock:
            if rater not in self._schedules:
                self._schedules[rater] = schedule(self.study, rater, self.seed)
            return self._schedules[rater]

    def item(self, rater: str, n: int) -> Item:
        items = self.schedule(rater)
        if not 0 <= n < len(items):
            raise ReviewError(f"no comparison {n} (the schedule has {len(items)})")
        return items[n]

    def next_item(self, rater: str) -> dict:
        """The rater's first comparison with a question unanswered (None when all are done) and progress."""
        items, current, done = self.schedule(rater), None, 0
        for it in items:
            given = self.answers.given(self.study, rater, it)
            if len(given) == len(QUESTIONS):
                done += 1
            elif current is None:
                current = (it, given)
        out = dict(rater=rater, done=done, total=len(items), item=None)
        if current is not None:
            it, given = current
            q = urllib.parse.quote(rater)
            out["item"] = dict(n=it.n, prompt=it.prompt.text, prompt_index=it.prompt.index, answers=given,
                               images={side: [f"/image?rater={q}&n={it.n}&side={side}&k={k}"
                                              for k in range(len(self.study.seeds))] for side in ("left", "right")})
        return out

    def answer(self, body: dict) -> dict:
        rater = check_rater(str(body.get("rater", "")))
        question, choice = body.get("question"), body.get("choice")
        if question not in QUESTIONS or choice not in CHOICES:
            raise ReviewError(f"question must be one of {list(QUESTIONS)} and choice one of {list(CHOICES)}")
        try:
            n = int(body.get("n"))
        except (TypeError, ValueError) as e:
            raise ReviewError("n must be a comparison's number") from e
        it = self.item(rater, n)
        self.answers.append(answer_row(self.study, rater, it, question, choice))
        return dict(saved=True, n=n, answers=self.answers.given(self.study, rater, it))

    def image_path(self, query: dict[str, str]) -> str:
        rater = check_rater(query.get("rater", ""))
        side, k, n = query.get("side"), query.get("k", ""), query.get("n", "")
        if side not in ("left", "right") or not k.isdigit() or not n.isdigit() or int(k) >= len(self.study.seeds):
            raise ReviewError("an image is /image?rater=NAME&n=N&side=left|right&k=K")
        it = self.item(rater, int(n))
        return self.study.image(it.left if side == "left" else it.right, it.prompt, self.study.seeds[int(k)])


class _Handler(BaseHTTPRequestHandler):
    review: Review  # set on the subclass `make_server` builds

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        pass  # quiet: one line per image request would bury the URL the command printed

    def _send(self, status: int, body: bytes, content_type: str, cache: str = "no-store") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, obj: object, status: int = HTTPStatus.OK) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _file(self, path: str, content_type: str, cache: str = "no-store") -> None:
        try:
            with open(path, "rb") as f:
                body = f.read()
        except OSError:
            self._json({"error": f"cannot read {os.path.basename(path)}"}, HTTPStatus.NOT_FOUND)
            return
        self._send(HTTPStatus.OK, body, content_type, cache)

    def do_GET(self):  # noqa: N802 (http.server's name)
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        try:
            if url.path in ("/", "/index.html"):
                self._file(os.path.join(STATIC, "index.html"), _TYPES[".html"])
            elif url.path.startswith("/static/") and os.path.basename(url.path) in os.listdir(STATIC):
                name = os.path.basename(url.path)
                self._file(os.path.join(STATIC, name), _TYPES.get(os.path.splitext(name)[1], "text/plain"))
            elif url.path == "/api/config":
                self._json(dict(questions=[dict(id=q, text=t) for q, t in QUESTIONS.items()], choices=list(CHOICES),
                                default_rater=self.review.default_rater, seeds=len(self.review.study.seeds)))
            elif url.path == "/api/item":
                self._json(self.review.next_item(check_rater(query.get("rater", ""))))
            elif url.path == "/image":
                # A comparison's images never change (sample folders are append-only): the browser may keep them.
                self._file(self.review.image_path(query), "image/png", cache="private, max-age=86400")
            else:
                self._json({"error": f"no page {url.path}"}, HTTPStatus.NOT_FOUND)
        except ReviewError as e:
            self._json({"error": str(e)}, HTTPStatus.BAD_REQUEST)

    def do_POST(self):  # noqa: N802
        if urllib.parse.urlsplit(self.path).path != "/api/answer":
            self._json({"error": "POST /api/answer only"}, HTTPStatus.NOT_FOUND)
            return
        try:
            size = int(self.headers.get("Content-Length", 0))
            if not 0 < size <= MAX_BODY:
                raise ReviewError(f"an answer is a JSON object of at most {MAX_BODY} bytes")
            body = json.loads(self.rfile.read(size))
            if not isinstance(body, dict):
                raise ReviewError("an answer is a JSON object")
            self._json(self.review.answer(body))
        except (ReviewError, json.JSONDecodeError, UnicodeDecodeError) as e:
            self._json({"error": str(e)}, HTTPStatus.BAD_REQUEST)


def open_review(study: Study, out: str, seed: int = 0, default_rater: str | None = None) -> Review:
    """The review of `study` answered into `out`/answers.jsonl (recorded in `out`/study.json first:
    a restart with other folders or another seed is refused)."""
    record(out, study, seed)
    rater = check_rater(default_rater) if default_rater else None
    return Review(study, AnswerFile(os.path.join(out, "answers.jsonl")), seed, rater)


def make_server(review: Review, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """A server of `review` bound to host:port (port 0: a free one; `server.server_address` says which)."""
    handler = type("ReviewHandler", (_Handler,), {"review": review})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as e:
        raise ReviewError(f"cannot listen on {host}:{port} ({e.strerror}): pass another --port, or --port=0 "
                          "for a free one") from e
    server.daemon_threads = True  # a browser's open connections do not hold the process at exit
    return server


def url(server: ThreadingHTTPServer, rater: str | None = None) -> str:
    """The address to open; on a wildcard host (0.0.0.0, a lab network), this machine's name."""
    host, port = server.server_address[:2]
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/" + (f"?rater={urllib.parse.quote(rater)}" if rater else "")


def serve(review: Review, host: str = "127.0.0.1", port: int = 0) -> None:
    """Serves the review page until interrupted (Ctrl-C), after printing the address to open."""
    server = make_server(review, host, port)
    s = review.study
    print(f"{len(s.prompts)} prompts x {len(s.seeds)} seeds, {len(s.systems)} systems: "
          f"{len(s.prompts) * math.comb(len(s.systems), 2)} comparisons per rater; answers go to {review.answers.path}")
    print(f"Open {url(server, review.default_rater)} (each rater: add ?rater=NAME, or type a name on the page)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
