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
from shared.keyring import Keyring, create_kek
from shared.logs import configure_logging
from shared.model_store import Manifest, ModelStore
from shared.settings import encryption_settings

log = logging.getLogger(__name__)


def builders() -> dict[str, Callable[[ModelStore], Manifest]]:
    """Every family's default models, in the registry's order, each family's in its own order."""
    return {
        name: build
        for family in FAMILIES
        for name, build in importlib.import_module(family.defaults_module).DEFAULT_MODELS.items()
    }


def ensure_defaults(store: ModelStore) -> list[str]:
    """Builds the default models missing from the store; returns the names it built. A builder that wants a
    text embedder (items with content vectors) runs after the others, with the nlp family's default encoder."""
    built = []
    ordered = sorted(builders().items(), key=lambda item: getattr(item[1], "wants_text_embedder", False))
    for name, build in ordered:
        if store.versions(name):
            continue
        log.info("building default model %s", name)
        if getattr(build, "wants_text_embedder", False):
            build(store, embed=importlib.import_module("services.nlp.defaults").text_embedder(store))
        else:
            build(store)
        built.append(name)
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", type=Path, default=Path("var/models"))
    parser.add_argument("--keys-dir", type=Path, help="KEK folder: the models are sealed (MAAS_DEFAULTS_KEYS_DIR)")
    parser.add_argument("--kek-id", help="the KEK that wraps their data keys (MAAS_DEFAULTS_KEK_ID)")
    parser.add_argument("--create-kek", action="store_true",
                        help="make the KEK first if the keys folder lacks it (make models: the local KEK)")  # fmt: skip
    args = parser.parse_args()
    configure_logging("defaults")
    settings = encryption_settings("defaults")
    keyring = Keyring(args.keys_dir or settings.keys_dir, args.kek_id or settings.kek_id)
    if args.create_kek and keyring.enabled and create_kek(keyring.keys_dir, keyring.kek_id):
        log.info("made the key-encryption key %s", keyring.keys_dir / keyring.kek_id)
    log.info("model store %s: %s", args.store, keyring.describe())
    built = ensure_defaults(ModelStore(args.store, keyring))
    log.info("default models ready in %s (built: %s)", args.store, ", ".join(built) or "none")


if __name__ == "__main__":
    main()
