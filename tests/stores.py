"""The default models as tests and benches use them: `make models` seals them under the local KEK in
var/models; each test session and bench works on a copy of its own, plain or sealed under another KEK."""

from __future__ import annotations

import os
from pathlib import Path

from services.defaults import ensure_defaults
from services.gnn.graph_store import GRAPHS_DIR
from shared.keyring import LOCAL_KEK_ID, Keyring, create_kek
from shared.model_store import ModelStore

ROOT = Path(__file__).resolve().parent.parent


def default_models() -> ModelStore:
    """var/models (or $MAAS_TEST_MODEL_STORE) with the local KEK, as `make models` leaves it; missing default
    models are built, sealed, as `make models` builds them."""
    keys = ROOT / "var" / "keys"
    create_kek(keys, LOCAL_KEK_ID)
    root = Path(os.environ.get("MAAS_TEST_MODEL_STORE", ROOT / "var" / "models"))
    store = ModelStore(root, Keyring(keys, LOCAL_KEK_ID))
    ensure_defaults(store)
    return store


def copy_store(source: ModelStore, store: ModelStore) -> ModelStore:
    """Every version of `source`, and of its stored graphs, published into `store`, decrypted in memory and
    sealed again under `store`'s KEK, or written plain when `store` has none; versions keep their numbers,
    pins stay pinned."""
    if source.root.name != GRAPHS_DIR and (source.root / GRAPHS_DIR).is_dir():
        copy_store(ModelStore(source.root / GRAPHS_DIR, source.keyring), ModelStore(store.root / GRAPHS_DIR,
                                                                                    store.keyring))  # fmt: skip
    for name in source.model_names():
        for version in source.versions(name):
            copied = store.copy_version(source, name, version)
            assert copied.version == version, f"{name}: versions of the source store are not 1, 2, ..."
        if source.pinned_version(name) is not None:
            store.pin_default(name, source.pinned_version(name))
    return store


def plain_defaults(root: Path) -> ModelStore:
    """A plain copy of the default models under `root`, for services started without keys."""
    return copy_store(default_models(), ModelStore(root))
