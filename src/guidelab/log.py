"""The ``guidelab`` logger: the library reports through Python :mod:`logging`, never ``print``.

Library modules call :func:`get_logger` (``guidelab.<module>``) and log; nothing is shown until an
application configures logging (the CLI calls :func:`enable`, ``--quiet`` passes ``quiet=True``).
"""

from __future__ import annotations

import logging
import sys

ROOT = "guidelab"
logging.getLogger(ROOT).addHandler(logging.NullHandler())


def get_logger(name: str | None = None) -> logging.Logger:
    """``guidelab`` or ``guidelab.<name>`` (a module's ``__name__`` is used as is)."""
    if not name or name == ROOT or name.startswith(ROOT + "."):
        return logging.getLogger(name or ROOT)
    return logging.getLogger(f"{ROOT}.{name}")


def enable(*, quiet: bool = False, level: int | None = None, stream=None) -> logging.Handler:
    """Show guidelab's log lines on ``stream`` (default stderr): INFO, or WARNING when ``quiet``.
    Idempotent: a second call replaces the handler it added before."""
    logger = logging.getLogger(ROOT)
    for h in [h for h in logger.handlers if getattr(h, "_guidelab", False)]:
        logger.removeHandler(h)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._guidelab = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level if level is not None else (logging.WARNING if quiet else logging.INFO))
    return handler
