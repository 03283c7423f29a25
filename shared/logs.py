"""Log set-up shared by every maas process."""

from __future__ import annotations

import logging
import sys


def configure_logging(process: str, level: str = "INFO") -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s {process} %(name)s: %(message)s",
        force=True,
    )
