"""`upscaled web`: check the optional dependencies, decide who may write, run uvicorn.

Binding anything but loopback without a token is refused unless the page is read-only: the
page can drop files into the inbox, promote models and start training.
"""

from __future__ import annotations

import importlib
import logging
import threading
from pathlib import Path

from loguru import logger

from core.config import Config, ConfigError, split_listen

EXIT_USAGE = 2
# import name -> distribution, for the message when one is missing
REQUIRED = {"starlette": "starlette", "uvicorn": "uvicorn", "jinja2": "jinja2", "prometheus_client": "prometheus-client",
            "python_multipart": "python-multipart"}
INSTALL_HINT = "pip install 'upscaled[web]'"


def missing_dependencies() -> list[str]:
    missing = []
    for module, dist in REQUIRED.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(dist)
    return missing


class _ToLoguru(logging.Handler):
    """uvicorn logs through the standard library; send it to loguru like every other line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(exception=record.exc_info).log(level, "{}", record.getMessage())


def main(cfg: Config, listen: str | None = None, config_path: Path | None = None, overrides: list[str] = ()) -> int:
    missing = missing_dependencies()
    if missing:
        logger.error("upscaled web needs {} (not installed here): {}", ", ".join(missing), INSTALL_HINT)
        return EXIT_USAGE
    listen = listen or cfg.web.listen
    try:
        host, port = split_listen(listen)
    except ValueError:
        raise ConfigError("--listen", "HOST:PORT, e.g. 127.0.0.1:8470 or [::1]:8470", listen) from None
    from web.security import Guard, is_loopback, load_token

    token = load_token(cfg)
    local = is_loopback(host.strip("[]").lower().rstrip("."))
    if not local and token is None and not cfg.web.read_only:
        logger.error("refusing to listen on {} without a token: anyone who reaches it could drop files, promote "
                     "models and start training. Set web.token or web.token_file, or web.read_only: true, or listen "
                     "on 127.0.0.1 (the default) behind a proxy", listen)
        return EXIT_USAGE

    import uvicorn

    from web.app import Site, create_app

    site = Site(cfg, Guard(token, cfg.web.read_only), loopback_only=local, config_path=config_path,
                overrides=list(overrides))
    app = create_app(site)
    # torch is needed only for promotion (model metadata is read without it): import it now, off the
    # request path. model.verify is what promotion runs; it imports torch and the generator.
    threading.Thread(target=lambda: importlib.import_module("model.verify"), name="warm-up", daemon=True).start()
    logging.basicConfig(handlers=[_ToLoguru()], level=logging.INFO, force=True)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers = []
        logging.getLogger(name).propagate = True
    access = "read-only" if cfg.web.read_only else ("writes need the token" if token else "writes open to local users")
    logger.info("web page on http://{}:{}/ ({}); status {}, inbox {}", f"[{host}]" if ":" in host else host, port,
                access, site.folders.status, site.folders.inbox)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                                           server_header=False, timeout_graceful_shutdown=3, lifespan="off"))
    server.run()  # until SIGINT/SIGTERM; uvicorn then re-raises the signal, so nothing runs after it
    if not server.started:
        logger.error("could not listen on {}", listen)
        return 1
    return 0
