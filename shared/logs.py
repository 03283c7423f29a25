"""Log set-up shared by every maas process: JSON lines carrying the request id, or plain text."""

from __future__ import annotations

import logging
import sys

from shared.observability import JsonFormatter


def configure_logging(process: str, level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(process))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {process} %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
