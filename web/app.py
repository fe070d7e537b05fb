"""The routes: one page (plain HTML, CSS and a little JavaScript), its JSON API, /metrics,
/healthz and /readyz.

Reads are plain GETs. Every POST goes through `Site.write`, which applies web.security.Guard
(read-only mode, the page's own header, same origin, the token). Blocking work (folder walks,
previews, torch) runs in Starlette's thread pool, never on the event loop.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, Response, StreamingResponse
from starlette.responses import JSONResponse as _JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from core.names import shown
from core import __version__
from core.config import Config
from web import files as files_mod
from web import models as models_mod
from web.metrics import StatusCollector, heartbeat_age, readiness, stale_after
from web.previews import Previews
from web.security import Guard, LoopbackHostsOnly, Refused, SecurityHeaders, resolve_under
from web.training import Training
from daemon import requests as upload_requests
from web.uploads import DRAIN_LIMIT, receive

HERE = Path(__file__).resolve().parent


class JSONResponse(_JSONResponse):
    """JSON in ASCII. Linux names are bytes: one that is not UTF-8 is held as os.fsdecode holds it,
    with lone surrogates, which UTF-8 cannot encode (Starlette's own JSONResponse answered 500)
    but a \\udcXX escape carries; the page shows it escaped and sends it back as it came, so
    Retry finds the very file."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


@dataclass
class Site:
    """Everything the routes share."""

    cfg: Config
    guard: Guard
    loopback_only: bool = False  # bound to loopback: refuse other Host names (DNS rebinding)
    config_path: Path | None = None
    overrides: list[str] = field(default_factory=list)
    previews: Previews | None = None
    training: Training | None = None
    history: list[tuple[float, int]] = field(default_factory=list)  # (time, processed): the throughput chart

    def __post_init__(self) -> None:
        self.folders = files_mod.Folders.of(self.cfg)
        self.previews = self.previews or Previews(self.cfg.web.preview_max_side)
        self.training = self.training or Training(self.cfg, self.config_path, self.overrides)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StatusCollector(self.folders.status, self.cfg.daemon.status_interval))

    def details(self, request: Request) -> bool:
        """Whether this reader may see details (pids, the host's name, tracebacks, folder paths):
        with a token configured, only a request that carries it; without one, only a page bound
        to loopback (a read-only page may listen anywhere without a token)."""
        if self.guard.token is not None:
            return self.guard.has_token(request.headers)
        return self.loopback_only

    async def write(self, request: Request) -> dict[str, Any]:
        """The checks every write passes; returns the JSON body (empty for other bodies)."""
        self.guard.check(request.headers, request.url.scheme)
        if request.headers.get("content-type", "").startswith("application/json"):
            try:
                body = await request.json()
            except ValueError:
                raise Refused(400, "a malformed JSON body") from None
            if not isinstance(body, dict):
                raise Refused(400, "expected a JSON object")
            return body
        return {}


def _int(request: Request, key: str, default: int | None = None) -> int:
    raw = request.query_params.get(key)
    if raw is None:
        if default is None:
            raise Refused(400, f"missing {key}")
        return default
    try:
        return int(raw)
    except ValueError:
        raise Refused(400, f"{key}: expected an integer") from None


def create_app(site: Site) -> Starlette:
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    cfg, folders = site.cfg, site.folders

    # -- the page ------------------------------------------------------------------------------

    def index(request: Request):
        tc = cfg.trainer
        return templates.TemplateResponse(request, "index.html", {
            "version": __version__, "access": site.guard.describe(), "scale": cfg.model.scale,
            "upload_max_mb": cfg.web.upload_max_mb, "trainer": tc if site.details(request) else
            dataclasses.replace(tc, data=None, val=None),  # folders on this host: behind the token
        })

    # -- health and metrics --------------------------------------------------------------------

    def healthz(request: Request):
        return JSONResponse({"status": "ok", "version": __version__})

    def readyz(request: Request):
        ok, problems = readiness(files_mod.status(folders), cfg.daemon.status_interval)
        return JSONResponse({"ready": ok, "problems": problems}, status_code=200 if ok else 503)

    def metrics(request: Request):
        return Response(generate_latest(site.registry), media_type=CONTENT_TYPE_LATEST)

    # -- reading -------------------------------------------------------------------------------

    def overview(request: Request):
        st = files_mod.status(folders)
        ok, problems = readiness(st, cfg.daemon.status_interval)
        st = st or {}
        files_mod.throughput_history(site.history, st)
        from daemon.status import is_running

        m = st.get("model") or {}
        more = site.details(request)
        fatal = st.get("fatal")
        if isinstance(fatal, dict) and not more:  # what went wrong, not where in the code
            fatal = {k: v for k, v in fatal.items() if k != "traceback"}
        return JSONResponse(files_mod.relative_paths({
            "daemon": {"running": bool(st) and is_running(st, stale_after(cfg.daemon.status_interval)),
                       "state": st.get("state"), "pid": st.get("pid") if more else None,
                       "host": st.get("host") if more else None,
                       "since": st.get("started"), "updated": st.get("updated"),
                       "heartbeat_age": heartbeat_age(st) if st else None, "fatal": fatal},
            "ready": ok, "problems": problems,
            "model": {"version": st.get("model_version"), "device": st.get("device"), "origin": m.get("origin"),
                      "file": m.get("file"), "loaded_at": m.get("loaded_at"), "probe": m.get("probe"),
                      "loading": m.get("loading"), "refused": m.get("refused"), "watching": m.get("watching"),
                      "figures": models_mod.served_figures(cfg, st)},
            "counts": {k: st.get(k) for k in ("queued", "in_flight", "processed", "failed")}
            | {"retrying": len(st.get("retrying") or []), "failed_folder": files_mod.failed_count(folders)},
            "throughput": st.get("throughput") or {},
            "history": site.history,
            "last_error": st.get("last_error"), "last_failed": st.get("last_failed"),
            "retrying": st.get("retrying") or [], "blocked": st.get("blocked") or [],
            "training": _training(request), "access": site.guard.describe() | {"details": more}, "now": time.time(),
        }, folders))

    def files(request: Request):
        st = files_mod.status(folders)
        return JSONResponse(files_mod.relative_paths({
            "done": files_mod.done_rows(folders, st), "failed": files_mod.failed_rows(folders),
            "queued": files_mod.queued_rows(folders, st)}, folders))

    def _output_and_original(request: Request) -> tuple[Path, Path | None, dict[str, Any]]:
        rel = request.query_params.get("out", "")
        output = resolve_under(folders.outbox, rel)
        entry = files_mod.record_of(folders, files_mod.status(folders), rel)
        orig_rel, original = files_mod.paired_original(folders, entry, rel)
        return output, original, {"output": rel, "original": orig_rel, "file": entry.get("file"),
                                  "model_version": entry.get("model_version"), "seconds": entry.get("seconds")}

    def compare(request: Request):
        output, original, info = _output_and_original(request)
        try:
            geo = site.previews.geometry(output)
        except (OSError, ValueError) as e:
            raise Refused(422, f"cannot read {info['output']}: {e}") from None
        why = None if original is not None else (
            "the original is not kept (daemon.originals: delete)" if folders.originals == "delete"
            else "its original is not in done/ any more")
        return JSONResponse({**info, **geo, "before_available": original is not None, "why_no_before": why})

    def preview(request: Request):
        output, original, _ = _output_and_original(request)
        side = request.query_params.get("side", "after")
        if side not in ("before", "after"):
            raise Refused(400, "side: before or after")
        if side == "before" and original is None:
            raise Refused(404, "the original of this output is not kept")
        try:
            if "x" in request.query_params:
                data = site.previews.crop(output, original, side, _int(request, "x"), _int(request, "y"),
                                          _int(request, "w", 512), _int(request, "h", 512))
                media = "image/png"
            else:
                data = site.previews.fit(output, original, side)
                media = "image/jpeg"
        except (OSError, ValueError) as e:
            raise Refused(422, f"cannot make a preview: {e}") from None
        return Response(data, media_type=media, headers={"cache-control": "private, max-age=300"})

    def models(request: Request):
        from daemon.status import daemon_model

        daemon = daemon_model(cfg) or {}  # what a running daemon serves, apart from the `current` pointer
        return JSONResponse(files_mod.relative_paths(
            models_mod.listing(cfg, daemon.get("version"), daemon.get("refused")) | {"learning": models_mod.learning(cfg)},
            folders))

    def learn_crop(request: Request):
        return Response(models_mod.learn_crop(cfg), media_type="image/png", headers={"cache-control": "private, max-age=60"})

    def _training(request: Request) -> dict[str, Any]:
        state = site.training.state()
        if not site.details(request):
            state.pop("pid", None)
        return state

    def runs(request: Request):
        return JSONResponse(files_mod.relative_paths({"runs": site.training.list_runs(), "training": _training(request)},
                                                     folders))

    def run_detail(request: Request):
        run = site.training.run_dir(request.path_params["name"])
        return JSONResponse({**site.training.summary(run), "curve": site.training.curve(run)})

    def sample(request: Request):
        run = site.training.run_dir(request.query_params.get("run", ""))
        name = request.query_params.get("file", "")
        path = resolve_under(run / "samples", name)
        return Response(site.previews.sheet(path), media_type="image/png",
                        headers={"cache-control": "private, max-age=300"})

    def train_state(request: Request):
        tc = cfg.trainer
        defaults = {"crop": tc.crop, "batch": tc.batch, "steps": tc.steps, "lr": tc.lr_g, "val_every": tc.val_every,
                    "scale": cfg.model.scale}
        if site.details(request):  # folders on this host: for those who may start a run
            defaults |= {"data": tc.data and str(cfg.resolve(tc.data)), "val": tc.val and str(cfg.resolve(tc.val)),
                         "data_root": cfg.web.data_root and str(cfg.resolve(cfg.web.data_root))}
        return JSONResponse(files_mod.relative_paths({**_training(request), "defaults": defaults}, folders)
                            if not site.details(request) else {**_training(request), "defaults": defaults})

    def train_estimate(request: Request):
        """Seconds per training step here, measured by a short probe at the form's batch and crop."""
        from web.training import probe_step_seconds

        batch, crop = _int(request, "batch", cfg.trainer.batch), _int(request, "crop", cfg.trainer.crop)
        if not (1 <= batch <= 64 and 4 * cfg.model.scale <= crop <= 1024):
            raise Refused(400, "batch 1..64 and crop up to 1024 px for an estimate")
        return JSONResponse(probe_step_seconds(cfg, batch, crop))

    # -- downloads and upload progress ------------------------------------------------------------

    def download(request: Request):
        """One output, streamed, under its own name."""
        path = files_mod.output_file(folders, request.query_params.get("out", ""))
        # A name that is not UTF-8 (names are bytes) gets U+FFFD where it cannot be said.
        return FileResponse(path, filename=path.name.encode("utf-8", "replace").decode(), content_disposition_type="attachment")

    def download_zip(request: Request):
        """Several outputs (out=… repeated: a selection, or one upload batch) as one zip, streamed."""
        outs = request.query_params.getlist("out")
        name = files_mod.clean_zip_name(request.query_params.get("name") or "upscaled")
        return StreamingResponse(files_mod.zip_stream(folders, outs), media_type="application/zip",
                                 headers={"content-disposition": f'attachment; filename="{name}.zip"'})

    def upload_progress(request: Request):
        """Where each file of an upload batch is: queued, working, done (with its output), failed."""
        names = request.query_params.getlist("file")
        since = request.query_params.get("since", "")
        return JSONResponse({"files": files_mod.progress(folders, files_mod.status(folders), names, since)})

    # -- writing -------------------------------------------------------------------------------

    async def upload(request: Request):
        site.guard.check(request.headers, request.url.scheme)
        body = request.stream()
        try:
            up = await receive(request.headers, body, folders.inbox, cfg.web.upload_max_mb << 20,
                               upload_requests.folder_for(folders.status))
        except Refused as e:
            if e.status == 413:  # read the rest (dropped) so the client gets the answer, not a reset
                drained = 0
                async for chunk in body:
                    drained += len(chunk)
                    if drained > DRAIN_LIMIT:
                        break
                logger.info("upload refused: {}", shown(str(e)))
            raise
        results = await run_in_threadpool(up.finish)
        return JSONResponse({"files": results}, status_code=200 if any(r["ok"] for r in results) or not results else 415)

    async def retry(request: Request):
        body = await site.write(request)
        dest = await run_in_threadpool(files_mod.retry, folders, str(body.get("file", "")))
        return JSONResponse({"file": body.get("file"), "inbox": dest})

    async def promote(request: Request):
        body = await site.write(request)
        path = models_mod.run_checkpoint(cfg, str(body.get("checkpoint", "")))
        code, lines = await run_in_threadpool(models_mod.promote, cfg, path, bool(body.get("force")))
        return JSONResponse({"ok": code == 0, "code": code, "log": lines}, status_code=200 if code == 0 else 409)

    async def rollback(request: Request):
        body = await site.write(request)
        version = body.get("version") or None
        code, lines = await run_in_threadpool(models_mod.rollback, cfg, str(version) if version else None)
        return JSONResponse({"ok": code == 0, "code": code, "log": lines}, status_code=200 if code == 0 else 409)

    async def train_start(request: Request):
        body = await site.write(request)
        return JSONResponse(await run_in_threadpool(site.training.start, body))

    async def train_stop(request: Request):
        await site.write(request)
        return JSONResponse(await run_in_threadpool(site.training.stop))

    async def train_resume(request: Request):
        body = await site.write(request)
        return JSONResponse(await run_in_threadpool(site.training.resume, str(body.get("run", ""))))

    # -- errors and headers --------------------------------------------------------------------

    async def refused(request: Request, exc: Refused):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

    routes = [
        Route("/", index),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        Route("/api/overview", overview),
        Route("/api/files", files),
        Route("/api/compare", compare),
        Route("/api/download", download),
        Route("/api/download.zip", download_zip),
        Route("/api/upload/progress", upload_progress),
        Route("/api/preview", preview),
        Route("/api/models", models),
        Route("/api/learn/crop", learn_crop),
        Route("/api/runs", runs),
        Route("/api/runs/{name}", run_detail),
        Route("/api/sample", sample),
        Route("/api/train", train_state),
        Route("/api/train/estimate", train_estimate),
        Route("/api/upload", upload, methods=["POST"]),
        Route("/api/retry", retry, methods=["POST"]),
        Route("/api/promote", promote, methods=["POST"]),
        Route("/api/rollback", rollback, methods=["POST"]),
        Route("/api/train/start", train_start, methods=["POST"]),
        Route("/api/train/stop", train_stop, methods=["POST"]),
        Route("/api/train/resume", train_resume, methods=["POST"]),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    middleware = [Middleware(SecurityHeaders)] + ([Middleware(LoopbackHostsOnly)] if site.loopback_only else [])
    return Starlette(routes=routes, middleware=middleware, exception_handlers={Refused: refused, HTTPException: http_error})
