"""The feedback web app: a page for raters and the HTTP API it uses (FastAPI, served by uvicorn).

API (every ``/api`` route but ``health`` needs ``Authorization: Bearer TOKEN``, a rater's token):

* ``GET /api/next``: the item to judge, ``{item_id, prompt, completions, kinds, policy_version, scale,
  progress}``; the same item until it is judged. 503 when none is ready yet (retry).
* ``POST /api/judgments`` with ``{item_id, kind, value, request_id?}``: stores one judgment and answers
  201 ``{id, duplicate, progress}`` once it is committed; a retried ``request_id`` answers 200 with the
  row it made. ``value`` per kind: see :mod:`rlfb.feedback.judgments`.
* ``GET /api/progress``: ``{rater_judgments, total_judgments, goal, policy_version}``.
* ``GET /api/health``: ``{ok: true}`` (no token).

Every error is a 4xx (or 503) with ``{"error": "what was wrong"}``, and nothing is stored. Security: the
body is at most :data:`~rlfb.feedback.judgments.MAX_BODY_BYTES`, JSON, with known fields only; the stored
prompt and completions are the item's, never the request's; no request names a file (the page and its
two assets are read once from the package); model text reaches the page as JSON and is shown with
``textContent`` (never parsed as HTML), and a Content-Security-Policy forbids inline and foreign scripts.
Bound to a loopback address, the app also refuses requests whose ``Host`` is not a loopback name (DNS
rebinding).
"""

# No ``from __future__ import annotations``: FastAPI reads the route functions' annotations (``Request``),
# which are imported inside create_app so that this module imports without FastAPI installed.
import json
import math
from dataclasses import dataclass
from importlib import resources
from typing import Any

from rlfb.feedback.items import ItemPool
from rlfb.feedback.judgments import MAX_BODY_BYTES, MAX_ID_CHARS, RATER_KINDS, JudgmentError, check_value
from rlfb.feedback.store import FeedbackStore

INSTALL_HINT = "the feedback server needs FastAPI and uvicorn: pip install 'rlfb[feedback]'"
ASSETS = {"app.js": "application/javascript", "style.css": "text/css"}
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                           "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
BODY_FIELDS = ("item_id", "kind", "value", "request_id")


@dataclass
class ServerSettings:
    """How the app behaves.

    Attributes:
        kinds: the judgment kinds raters may give (the page shows only those).
        scale: (lowest, highest) rating.
        goal: judgments per rater the progress bar counts towards (0: no goal).
        wait_s: how long ``GET /api/next`` waits for an item before answering 503.
        loopback_only: refuse requests whose Host header is not a loopback name.
    """

    kinds: tuple[str, ...] = RATER_KINDS
    scale: tuple[float, float] = (1.0, 5.0)
    goal: int = 0
    wait_s: float = 10.0
    loopback_only: bool = True


def require_web_libraries() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error


def check_settings(settings: ServerSettings) -> None:
    unknown = [kind for kind in settings.kinds if kind not in RATER_KINDS]
    if unknown or not settings.kinds:
        raise ValueError(f"kinds {list(settings.kinds)}: expected some of {', '.join(RATER_KINDS)}")
    low, high = settings.scale
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"rating scale {settings.scale}: expected two finite numbers, lowest first")


def create_app(store: FeedbackStore, pool: ItemPool, settings: ServerSettings | None = None) -> Any:
    """The FastAPI app over ``store`` and ``pool`` (start the pool yourself, or use :func:`serve`)."""
    require_web_libraries()
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    settings = settings or ServerSettings()
    check_settings(settings)
    static = resources.files("rlfb.feedback") / "static"
    page = (static / "index.html").read_text(encoding="utf-8")
    assets = {name: (static / name).read_text(encoding="utf-8") for name in ASSETS}
    app = FastAPI(title="rlfb feedback", docs_url=None, redoc_url=None, openapi_url=None)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    app.add_middleware(_Guard, loopback_only=settings.loopback_only)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exception: StarletteHTTPException) -> JSONResponse:
        return error(exception.status_code, str(exception.detail))

    @app.exception_handler(JudgmentError)
    async def judgment_error(request: Request, exception: JudgmentError) -> JSONResponse:
        return error(exception.status, str(exception))

    def rater_of(request: Request) -> str:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise JudgmentError("missing rater token: send 'Authorization: Bearer TOKEN' (create one with "
                                "`rlfb feedback add-rater NAME`)", 401)
        if len(token) > 256:
            raise JudgmentError("the rater token is too long to be one", 401)
        rater = store.rater_for_token(token.strip())
        if rater is None:
            raise JudgmentError("unknown rater token; ask whoever runs the server for yours", 401)
        return rater

    def progress(rater: str) -> dict[str, Any]:
        return {"rater_judgments": store.count(rater), "total_judgments": store.count(),
                "goal": settings.goal or None, "policy_version": pool.version[0]}

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return Response(page, media_type="text/html; charset=utf-8")

    @app.get("/static/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in assets:  # a fixed set read at start-up: no request reaches the file system
            raise JudgmentError(f"no asset {name[:40]!r}", 404)
        return Response(assets[name], media_type=ASSETS[name] + "; charset=utf-8")

    @app.get("/api/health")
    async def health() -> dict[str, Any]:
        return {"ok": True}

    @app.get("/api/progress")
    async def get_progress(request: Request) -> dict[str, Any]:
        return progress(rater_of(request))

    @app.get("/api/next")
    async def next_item(request: Request) -> Any:
        rater = rater_of(request)
        item = pool.next_for(rater, wait_s=0.0)  # an item is ready (the filler keeps some): no thread hop
        if item is None:
            item = await _run_in_thread(pool.next_for, rater, settings.wait_s)
        if item is None:
            return error(503, "no item is ready yet (the policy is still writing); try again in a moment")
        kinds = [kind for kind in RATER_KINDS if kind in settings.kinds and kind in _mode_kinds(item.mode)]
        return {"item_id": item.id, "prompt": item.prompt, "completions": item.completions, "kinds": kinds,
                "policy_version": item.policy_version, "scale": list(settings.scale), "progress": progress(rater)}

    @app.post("/api/judgments")
    async def post_judgment(request: Request) -> Any:
        rater = rater_of(request)
        body = await _read_json_body(request)
        if store.synchronous == "FULL":  # the commit waits for an fsync: let other requests go on meanwhile
            return await _run_in_thread(_store_judgment, body, rater)
        return _store_judgment(body, rater)  # the commit is a write to the OS (~0.3 ms): cheaper than a thread hop

    def _store_judgment(body: dict[str, Any], rater: str) -> Any:
        item_id, kind, value, request_id = (body.get(name) for name in BODY_FIELDS)
        for name, text in (("item_id", item_id), ("request_id", request_id)):
            if text is not None and (not isinstance(text, str) or not 0 < len(text) <= MAX_ID_CHARS):
                raise JudgmentError(f"{name!r} must be a string of 1 to {MAX_ID_CHARS} characters")
        if item_id is None:
            raise JudgmentError("a judgment needs 'item_id' (from GET /api/next)")
        if not isinstance(kind, str):
            raise JudgmentError(f"a judgment needs 'kind', one of {', '.join(settings.kinds)}")
        if not isinstance(value, dict):
            raise JudgmentError("a judgment needs 'value', an object such as {\"label\": 1}")
        if kind in RATER_KINDS and kind not in settings.kinds:
            raise JudgmentError(f"this server does not take {kind} judgments; it takes {', '.join(settings.kinds)}")
        item = store.item(item_id)
        if item is None:
            raise JudgmentError(f"unknown item {item_id!r}; ask GET /api/next for one", 404)
        checked = check_value(kind, value, item.mode, settings.scale)
        judgment_id, created = store.add_judgment(item_id, rater, kind, checked, request_id=request_id)
        pool.judged(rater, item_id)
        return JSONResponse({"id": judgment_id, "duplicate": not created, "progress": progress(rater)},
                            status_code=201 if created else 200)

    async def _read_json_body(request: Request) -> dict[str, Any]:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise JudgmentError(f"send the judgment as application/json, not {content_type or 'no content type'!r}",
                                415)
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
            raise JudgmentError(f"the request body is over {MAX_BODY_BYTES} bytes", 413)
        chunks, size = [], 0
        async for chunk in request.stream():  # also bounds a body sent without Content-Length
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise JudgmentError(f"the request body is over {MAX_BODY_BYTES} bytes", 413)
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks).decode("utf-8"), parse_constant=_refuse_constant)
        except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exception:
            raise JudgmentError(f"the request body is not valid JSON: {exception}", 400) from None
        if not isinstance(body, dict):
            raise JudgmentError(f"the request body must be a JSON object, got {type(body).__name__}", 400)
        unknown = sorted(set(body) - set(BODY_FIELDS))
        if unknown:
            raise JudgmentError(f"unknown field(s) {[name[:40] for name in unknown][:5]}; a judgment has "
                                f"{list(BODY_FIELDS)}")
        return body

    return app


async def _run_in_thread(function: Any, *args: Any) -> Any:
    """Run ``function`` in a worker thread, so that the event loop serves other requests while it waits.

    Only for what waits (an fsync, an item not ready yet): each hop costs two handovers of the GIL, and
    under load (20 raters, a filler thread) those were much of the request's time (benchmarks/feedback.py).
    """
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(function, *args)


SECURITY_HEADERS = [(b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
                    (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                    (b"cache-control", b"no-store")]


class _Guard:
    """ASGI middleware: refuses a non-loopback Host (when bound to loopback) and adds the security headers
    to every answer.

    A plain ASGI middleware, not Starlette's ``BaseHTTPMiddleware`` (``@app.middleware("http")``), which
    runs each request through an extra task and a streamed copy of the response (with the rater index,
    the event-loop commits and batch refills, the server's CPU per judgment fell from 4.3 to 2.5 ms in
    ``benchmarks/feedback.py --raters 20 --judgments 100``).
    """

    def __init__(self, app: Any, loopback_only: bool) -> None:
        self.app = app
        self.loopback_only = loopback_only

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        if self.loopback_only:
            header = next((value for name, value in scope["headers"] if name == b"host"), b"")
            host = _host_name(header.decode("latin-1"))
            if host not in LOOPBACK_HOSTS:
                from starlette.responses import JSONResponse

                refusal = JSONResponse({"error": f"this server answers only to 127.0.0.1 or localhost, not "
                                                 f"Host {host!r}"}, status_code=421)
                await refusal(scope, receive, send_with_headers)
                return
        await self.app(scope, receive, send_with_headers)


def _host_name(header: str) -> str:
    """The name in a Host header, without its port (``[::1]:8000`` -> ``[::1]``)."""
    if header.startswith("["):
        return header.split("]")[0] + "]"
    return header.rsplit(":", 1)[0]


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _mode_kinds(mode: str) -> tuple[str, ...]:
    from rlfb.feedback.judgments import ITEM_MODES

    return ITEM_MODES[mode]


def serve(store: FeedbackStore, pool: ItemPool, settings: ServerSettings | None = None, host: str = "127.0.0.1",
          port: int = 8000, log_level: str = "warning") -> None:
    """Run the app with uvicorn until interrupted (the pool's filler runs meanwhile)."""
    require_web_libraries()
    import uvicorn

    settings = settings or ServerSettings()
    if host not in LOOPBACK_HOSTS:
        settings.loopback_only = False
    app = create_app(store, pool, settings)
    pool.start()
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
    finally:
        pool.stop()
