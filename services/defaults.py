"""`python -m services.defaults`: builds each family's default models when the store lacks them.

Every model trains offline, from data that ships with the installed packages or the repo, in seconds.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from collections.abc import Callable
from pathlib import Path

from shared.families import FAMILIES
from shared.logs import configure_logging
from shared.model_store import Manifest, ModelStore

log = logging.getLogger(__name__)


def builders() -> dict[str, Callable[[ModelStore], Manifest]]:
    """Every family's default models, in the registry's order, each family's in its own order."""
    return {
        name: build
        for family in FAMILIES
        for name, build in importlib.import_module(family.defaults_module).DEFAULT_MODELS.items()
    }


def ensure_defaults(store: ModelStore) -> list[str]:
    """Builds the default models missing from the store; returns the names it built."""
    built = []
    for name, build in builders().items():
        if store.versions(name):
            continue
        log.info("building default model %s", name)
        build(store)
        built.append(name)
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", type=Path, default=Path("var/models"))
    args = parser.parse_args()
    configure_logging("defaults")
    built = ensure_defaults(ModelStore(args.store))
    log.info("default models ready in %s (built: %s)", args.store, ", ".join(built) or "none")


if __name__ == "__main__":
    main()
