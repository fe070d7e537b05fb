"""The systemd notify protocol, spoken directly: one datagram per message to $NOTIFY_SOCKET.

READY=1 once the model is loaded and warm, STATUS=<one line>, WATCHDOG=1 at half of
$WATCHDOG_USEC, STOPPING=1 on shutdown. Without $NOTIFY_SOCKET (not under systemd) every call
does nothing.
"""

from __future__ import annotations

import os
import socket
import time

from loguru import logger


class Notifier:
    def __init__(self, environ: dict | None = None):
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET") or ""
        self.address: str | bytes | None = None
        if addr.startswith("@"):
            self.address = b"\0" + addr[1:].encode()  # abstract namespace
        elif addr.startswith("/"):
            self.address = addr
        self.watchdog_interval: float | None = None  # seconds between WATCHDOG=1 pings
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        if usec and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1e6 / 2
        self._last_ping = 0.0
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """Send KEY=value lines (keys upper-cased); False if not under systemd or the send failed."""
        if self.address is None:
            return False
        msg = "\n".join(f"{k.upper()}={v}" for k, v in fields.items())
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(msg.encode(), self.address)
            return True
        except OSError as e:
            logger.debug("sd_notify {!r} failed: {}", msg, e)
            return False

    def ready(self, status: str = "") -> None:
        self.send(ready=1, **({"status": status} if status else {}))

    def status(self, text: str) -> None:
        self.send(status=text.replace("\n", " "))

    def stopping(self) -> None:
        self.send(stopping=1)

    def watchdog(self, now: float | None = None) -> None:
        """Ping if half the watchdog period has passed; call it from the processing loop."""
        if self.watchdog_interval is None:
            return
        now = time.monotonic() if now is None else now
        if now - self._last_ping >= self.watchdog_interval:
            self.send(watchdog=1)
            self._last_ping = now

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
