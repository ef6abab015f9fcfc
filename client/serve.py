"""The partner's recommendation API (FastAPI on uvicorn, 127.0.0.1 by default).

    GET  /users/{user_id}/recommendations?k=10&explain=true   top-K unseen items, with reasons
    POST /events   {"user_id": "42", "item_id": "50", "timestamp": 890000000}   record feedback
    GET  /health   model file and version, events in the store

Events go to the partner's SQLite event store, which is also its training log
(``data-path = events.sqlite``), so feedback trains the next federated round. The API
reloads the model when a newer file appears at ``--model`` (a ``model.pt`` or a folder of
run directories), checking at most every ``reload_interval`` seconds. A request the API
cannot serve gets a 4xx with ``{"error": "..."}`` naming the field.

With an ``api_token``, every endpoint (``/health`` too: it names files and counts events) needs
``Authorization: Bearer <token>``; anything else gets a 401 and touches neither model nor store.
"""

from __future__ import annotations

import hmac
import logging
import math
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from client.recommend import GlobalModel, Recommender, find_model_file, load_global_model
from common.data.event_store import EventStore
from common.errors import FedRecError

LOG = logging.getLogger("fedrec.serve")
# new events enter the partner's item chain (chain-weight) at most this often: a rebuild reads the whole store
# (about 0.3 s at 100,000 events) on the event loop, which every new event made the next request pay (a review)
CHAIN_REFRESH_S = 60.0
MAX_K = 200  # larger lists are a batch job, not a request
MAX_BODY_BYTES = 64 * 1024  # an event is well under 1 KB; a 200 MB body was read whole into memory
FLOAT32_MAX = 3.4028234663852886e38  # ratings are stored as float32 by the training log reader
NO_STORE = {"Cache-Control": "no-store"}  # users' recommendations: no gateway or browser keeps a copy


def _trainable_id(v: str) -> str:
    # 201 means the event trains: the log reader strips spaces and NULs and drops "nan" ids, so such an
    # id would be dropped or merged with another user's (" a" and "a\0" become "a")
    if v != v.strip() or "\x00" in v:
        raise ValueError("must not start or end with spaces or contain NUL characters")
    if v.lower() == "nan":
        raise ValueError("'nan' reads as a missing id in the training log")
    if not v:  # GET /users//recommendations answered a cold-start list (a serving review)
        raise ValueError("must not be empty")
    if "\ufffd" in v:  # what bytes that are not UTF-8 in the URL decode to: no POST can store that id
        raise ValueError("must be UTF-8 text (it holds bytes that are not)")
    return v


# An id as POST /events accepts it; GET checks the same, since no event can ever reach a user it refuses
# (a silent cold-start list answered "42 " and "42%00")
TrainableId = Annotated[str, AfterValidator(_trainable_id)]


FUTURE_SLACK_S = 86_400  # an event's time may run this far ahead of the server's clock (clocks differ)


class EventIn(BaseModel):
    """One interaction a user just had (``timestamp``: unix seconds, default now)."""

    # A misspelt field ("ratng", "time") was dropped in silence with a 201: the rating lost, the time "now"
    model_config = ConfigDict(extra="forbid")
    user_id: TrainableId = Field(min_length=1, max_length=200)
    item_id: TrainableId = Field(min_length=1, max_length=200)
    # The training log reader drops times from 2**62 on; a JSON true/false is not a time (pydantic would read 1/0)
    timestamp: int | None = Field(default=None, ge=0, lt=2**62)
    rating: float | None = None
    event: str = Field(default="interaction", min_length=1, max_length=50)

    @field_validator("timestamp", mode="before")
    @classmethod
    def _not_a_boolean(cls, v: object) -> object:
        if isinstance(v, bool):
            raise ValueError("timestamp must be unix seconds, not true/false")
        return v

    @field_validator("timestamp")
    @classmethod
    def _not_in_the_future(cls, v: int | None) -> int | None:
        # A time in milliseconds (or years ahead) was stored and stayed the user's "last" event for good (a review)
        if v is not None and v > time.time() + FUTURE_SLACK_S:
            hint = " (milliseconds? give unix seconds)" if v > 1e11 else ""
            raise ValueError(f"timestamp {v} is more than a day in the future{hint}")
        return v

    @field_validator("rating")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not (math.isfinite(v) and abs(v) <= FLOAT32_MAX):
            # 201 means the event trains: the log reader drops ratings beyond float32's range
            raise ValueError("rating must be a finite number within float32's range")
        return v


class BodyLimit:
    """ASGI wrapper: a request body over ``limit`` bytes gets a 413 before it is read into memory
    (announced by Content-Length) or as soon as it passes the limit (chunked)."""

    def __init__(self, app, limit: int) -> None:  # noqa: ANN001 -- any ASGI app
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.limit:
            return await JSONResponse(status_code=413, content={"error": f"body: over {self.limit} bytes"})(
                scope, receive, send)
        seen = 0

        async def limited():  # noqa: ANN202
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise StarletteHTTPException(413, f"body: over {self.limit} bytes")
            return message

        return await self.app(scope, limited, send)


class ModelWatcher:
    """Holds the current :class:`Recommender`; swaps in a newer model file when one appears.

    A newer file that cannot be loaded (half-copied, wrong format) is logged and the
    current model keeps serving; the next check tries again.
    """

    def __init__(self, model_path: str | os.PathLike, titles: dict[str, str], reload_interval: float,
                 loaded: tuple[tuple[int, int, int], GlobalModel] | None = None, *, use_chain: bool = True) -> None:
        self.model_path = Path(model_path)
        self.titles = titles
        self.reload_interval = reload_interval
        self._loaded, model = loaded or self.load(model_path)
        self.use_chain = use_chain
        self.recommender = self._recommender(model)
        self.reloads = 0
        self.last_error: str | None = None
        self._failed: tuple[Path, tuple[int, int, int]] | None = None  # the file that failed to load, as it was
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    @staticmethod
    def load(model_path: str | os.PathLike) -> tuple[tuple[int, int, int], GlobalModel]:
        """(the model file's identity, the model): the identity is taken before loading, so a file
        replaced meanwhile is reloaded. Raises :class:`FedRecError` if the model cannot load."""
        key = _file_key(find_model_file(model_path))
        return key, load_global_model(model_path)

    def _recommender(self, model: GlobalModel) -> Recommender:
        return Recommender(model, self.titles, use_chain=self.use_chain, chain_refresh_s=CHAIN_REFRESH_S)

    @property
    def current(self) -> GlobalModel:
        return self.recommender.gm

    def maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.reload_interval:
            return
        with self._lock:
            if now - self._checked < self.reload_interval:
                return
            self._checked = now
            try:
                file = find_model_file(self.model_path)
                # any other file at that path, older too (a rollback restores a backup with its old time), and one
                # with the same time (cp -p, coarse timestamps): the inode and size tell them apart
                key = _file_key(file)
                if file == self.current.path and key == self._loaded:
                    self.last_error = None  # the newest file is the one served: an error about another is over
                    return
                if (file, key) == self._failed:  # the same bad file: said once, not at every interval (a review)
                    return
                self._failed = (file, key)  # until it loads
                loaded = load_global_model(file)
                missing = len(set(self.current.index) - set(loaded.index))
                if missing:  # another federation's model: the store's events and titles would not match it
                    raise FedRecError(f"{file}: its catalogue lacks {missing} of the {len(self.current.catalogue)} "
                                      "items of the model being served; not switching to it")
                self.recommender = self._recommender(loaded)
                self._loaded, self._failed = key, None
                self.reloads += 1
                self.last_error = None
                LOG.info("loaded model %s (version %.3f)", file, self.current.version)
            except (FedRecError, OSError) as exc:
                self.last_error = str(exc)
                LOG.warning("keeping the current model: %s", exc)
            except Exception as exc:  # noqa: BLE001 -- any file that cannot load: keep serving the current model
                self.last_error = f"{type(exc).__name__}: {exc}"
                LOG.exception("keeping the current model: unexpected error loading %s", self.model_path)


def _file_key(path: Path) -> tuple[int, int, int]:
    """What tells two versions of a model file apart: (inode, modification time in ns, size)."""
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


def create_app(*, model: str | os.PathLike, store: EventStore, titles: dict[str, str] | None = None,
               reload_interval: float = 2.0, api_token: str | None = None,
               loaded: tuple[tuple[int, int, int], GlobalModel] | None = None, use_chain: bool = True) -> FastAPI:
    """The API over ``model`` (file or folder) and ``store``; raises :class:`FedRecError` if the model cannot load.
    ``api_token``: required as a bearer token on every request (None: no authentication, loopback use).
    ``loaded``: :meth:`ModelWatcher.load`'s result when the caller has loaded the model already.
    ``use_chain`` false: rank by the model alone though its config blends in the partner's item chain."""
    watcher = ModelWatcher(model, titles or {}, reload_interval, loaded, use_chain=use_chain)
    app = FastAPI(title="fedrec partner recommendations", version="1")
    app.state.watcher = watcher
    app.state.store = store

    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)

    if api_token:
        expected = api_token.encode()

        @app.middleware("http")
        async def _require_token(request: Request, call_next):  # noqa: ANN001, ANN202
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            given_bytes = given.strip().encode("utf-8", "replace")
            # the scheme name is case-insensitive (RFC 7235); the token compared in constant time
            if scheme.lower() != "bearer" or not hmac.compare_digest(given_bytes, expected):
                return JSONResponse(status_code=401, headers={"WWW-Authenticate": "Bearer"},
                                    content={"error": "missing or wrong API token (send Authorization: Bearer <token>)"})
            return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if request.method == "POST" and not (kind == "application/json" or kind.endswith("+json")):
            # FastAPI reads only a JSON content type as JSON: curl -d sends a form type, and the error said
            # "Input should be a valid dictionary", pointing away from the header (a review)
            return JSONResponse(status_code=415, content={
                "error": f"body: send it with Content-Type: application/json (this request: {kind or 'none'})"})
        problems = []
        for err in exc.errors():
            if err.get("type") == "json_invalid":
                problems.append(f"body: not valid JSON ({err.get('ctx', {}).get('error', 'cannot be parsed')})")
                continue
            if err.get("type") == "extra_forbidden":
                problems.append(f"{'.'.join(str(p) for p in err['loc'][1:])}: not a field of an event "
                                f"({', '.join(EventIn.model_fields)})")
                continue
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")) or "request"
            problems.append(f"{where}: {err.get('msg', 'invalid')}")
        return JSONResponse(status_code=422, content={"error": "; ".join(problems)})

    @app.exception_handler(FedRecError)
    async def _user_error(request: Request, exc: FedRecError) -> JSONResponse:
        return JSONResponse(status_code=400, content={"error": str(exc)})

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Unknown paths, wrong methods, bodies that are not UTF-8 JSON
        message = str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in message:
            message = "body: not valid UTF-8 JSON"
        elif exc.status_code == 404:
            message = f"no such endpoint: {request.url.path}"
        return JSONResponse(status_code=exc.status_code, content={"error": message}, headers=exc.headers)

    @app.exception_handler(sqlite3.OperationalError)
    async def _store_busy(request: Request, exc: sqlite3.OperationalError) -> JSONResponse:
        # Another process held the store's write lock past SQLite's 30 s wait (or the disk failed)
        return JSONResponse(status_code=503, headers={"Retry-After": "5"},
                            content={"error": f"event store {store.path.name} is busy or unavailable ({exc}); retry"})

    @app.exception_handler(sqlite3.DatabaseError)
    async def _store_damaged(request: Request, exc: sqlite3.DatabaseError) -> JSONResponse:
        # (OperationalError, a subclass, is handled above.) A damaged file answered a plain-text 500 (a review)
        LOG.error("event store %s: %s; restore it from a backup", store.path, exc)
        return JSONResponse(status_code=503, content={
            "error": f"event store {store.path.name} is damaged ({exc}); the partner must restore it from a backup"})

    @app.get("/health", response_model=None)
    def health() -> JSONResponse:
        watcher.maybe_reload()
        gm = watcher.current
        return JSONResponse({"status": "ok", "model": {"path": str(gm.path), "version": gm.version,
                                                       "items": len(gm.catalogue), "reloads": watcher.reloads,
                                                       "last_error": watcher.last_error},
                             "events": store.count()}, headers=NO_STORE)

    # NOTE: async and a ready JSONResponse: the work is a few ms of CPU on one torch thread either way;
    # running it on the event loop skips the thread-pool hop (~0.7 ms measured) and FastAPI's re-encoding of
    # the response. The store read never waits for a writer on the loop: the store is in WAL mode (in the
    # rollback journal another process's commit froze every endpoint for up to 30 s).
    @app.get("/users/{user_id:path}/recommendations", response_model=None)  # :path: an id may hold "/"
    # no length limit: a partner's imported log has none, and its long ids are served (a review: POST's 200 refused them)
    async def recommendations(user_id: TrainableId,
                              k: int = Query(10, ge=1, le=MAX_K), explain: bool = True) -> JSONResponse:
        watcher.maybe_reload()
        recommender = watcher.recommender  # one model for the whole request, even if a reload lands meanwhile
        result = recommender.recommend(user_id, store, k, explain=explain)  # cold start: store.item_counts()
        return JSONResponse({**result.to_dict(), "model_version": recommender.gm.version}, headers=NO_STORE)

    @app.post("/events", status_code=201, response_model=None)
    def post_event(event: EventIn) -> JSONResponse | dict:
        watcher.maybe_reload()  # an item added since (add-items) is known at once, as for a GET (a review)
        gm = watcher.current
        if event.item_id not in gm.index:
            return JSONResponse(status_code=422, content={
                "error": f"item_id: {event.item_id!r} is not in the model's catalogue ({len(gm.catalogue)} items)"})
        ts = int(time.time()) if event.timestamp is None else event.timestamp
        event_id, new = store.add_once(event.user_id, event.item_id, timestamp=ts, rating=event.rating,
                                       event=event.event)
        body = {"id": event_id, "user_id": event.user_id, "item_id": event.item_id, "timestamp": ts}
        if not new:  # a 201 read as stored while a second rating or kind in the same second was dropped (a review)
            return JSONResponse(status_code=200, content={**body, "duplicate": True, "note": (
                "an event of this user and item at this timestamp is already stored (a retried POST?); it is kept "
                "as it was, and this one's rating and event are not stored")})
        return body

    return app


def serve(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000, tls_certfile: str | None = None,
          tls_keyfile: str | None = None) -> None:
    """Run ``app`` on uvicorn until interrupted (Ctrl-C / SIGTERM stop it cleanly); HTTPS with
    ``tls_certfile``/``tls_keyfile`` (PEM).

    uvicorn uses uvloop and httptools when installed (the ``serve`` extra): less CPU per request."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, ssl_certfile=tls_certfile,
                ssl_keyfile=tls_keyfile)
