"""The ``guidelab`` logger: the library reports through Python :mod:`logging`, never ``print``.

Library modules call :func:`get_logger` (``guidelab.<module>``) and log; nothing is shown until an
application configures logging (the CLI calls :func:`enable`, ``--quiet`` passes ``quiet=True``).
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import TextIO

ROOT = "guidelab"
logging.getLogger(ROOT).addHandler(logging.NullHandler())


def get_logger(name: str | None = None) -> logging.Logger:
    """``guidelab`` or ``guidelab.<name>`` (a module's ``__name__`` is used as is)."""
    if not name or name == ROOT or name.startswith(ROOT + "."):
        return logging.getLogger(name or ROOT)
    return logging.getLogger(f"{ROOT}.{name}")


class _Held(logging.StreamHandler):
    """A stream handler that holds INFO lines for up to ``hold`` seconds after the first one: a command
    refused in that time prints only its error (:func:`discard`); the lines come out at :func:`release`,
    with the first WARNING, or when the time is up (a timer), so no phase stays silent for long."""

    def __init__(self, stream: TextIO, hold: float) -> None:
        super().__init__(stream)
        self.hold, self.open = hold, False
        self.held: list[logging.LogRecord] = []
        self.timer: threading.Timer | None = None
        self.lock_ = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self.lock_:
            if not self.open and record.levelno < logging.WARNING:
                if not self.held:
                    timer = threading.Timer(self.hold, self.let_out)
                    timer.daemon = True
                    timer.start()
                    self.timer = timer
                self.held.append(record)
                return
        self.let_out()
        super().emit(record)

    def let_out(self) -> None:
        """Emit the held lines and stop holding (not ``release``: that name is logging.Handler's lock)."""
        with self.lock_:
            held, self.held, self.open = self.held, [], True
            if self.timer is not None:
                self.timer.cancel()
        for r in held:
            super().emit(r)

    def drop(self) -> None:
        with self.lock_:
            self.held = []
            if self.timer is not None:
                self.timer.cancel()


def _handlers() -> list[logging.Handler]:
    return [h for h in logging.getLogger(ROOT).handlers if getattr(h, "_guidelab", False)]


def release() -> None:
    """Print the INFO lines an :func:`enable` ``hold`` handler is holding (call when the work starts)."""
    for h in _handlers():
        if isinstance(h, _Held):
            h.let_out()


def discard() -> None:
    """Drop the held INFO lines (a command refused with one error line)."""
    for h in _handlers():
        if isinstance(h, _Held):
            h.drop()


def enable(*, quiet: bool = False, level: int | None = None, stream: TextIO | None = None, hold: float = 0.0) -> logging.Handler:
    """Show guidelab's log lines on ``stream`` (default stderr): INFO, or WARNING when ``quiet``.
    Idempotent: a second call replaces the handler it added before. ``hold`` > 0: INFO lines are held up
    to that many seconds (see :class:`_Held`; :func:`release`, :func:`discard`)."""
    logger = logging.getLogger(ROOT)
    for h in _handlers():
        if isinstance(h, _Held):
            h.let_out()
        logger.removeHandler(h)
    out = stream if stream is not None else sys.stderr
    handler: logging.StreamHandler = _Held(out, hold) if hold > 0 else logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._guidelab = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level if level is not None else (logging.WARNING if quiet else logging.INFO))
    return handler
