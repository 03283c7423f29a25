"""Loading a model version from an encrypted store against a plain one (the encryption issue's bench).

Run with `make bench`. minilm-l6-v2 v1 (~87 MB of artifacts) is copied from var/models into two
temporary stores, one plain and one sealed under a fresh KEK, and loaded the way a service loads a
version: manifest (index hash checked, unwrapped and decrypted when sealed), every artifact read and
checked (sha256 over what is stored, then decrypted in memory), the ONNX Runtime session and tokenizer
built from bytes, and one warm-up call. Loads alternate between the two stores, so drift on a shared
machine falls on both alike. The target is at most 1.3x the plain load time.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

from services.defaults import ensure_defaults
from services.nlp.defaults import MINILM
from services.nlp.runtime import nlp_loader
from services.nlp.settings import NlpSettings
from shared.keyring import Keyring, create_kek
from shared.model_store import ModelStore
from shared.onnx_session import OnnxConfig

ROUNDS = int(os.environ.get("MAAS_BENCH_ENCRYPTION_ROUNDS", "7"))
TARGET = 1.3


def load_once(store: ModelStore, config: OnnxConfig, max_length: int) -> tuple[float, float]:
    """(seconds to load and warm up the version, of which reading and checking its files)."""
    started = time.perf_counter()
    manifest = store.manifest(MINILM, 1)
    artifacts = store.artifacts(manifest).check_all()
    checked = time.perf_counter()
    model = nlp_loader(store, config, max_length)(manifest, artifacts)
    model.warm_up(1)
    return time.perf_counter() - started, checked - started


def main() -> None:
    source = ModelStore(Path("var/models"), Keyring(Path("var/keys")))
    ensure_defaults(source)
    settings = NlpSettings(device="cpu")
    config = OnnxConfig.from_settings(settings)
    with tempfile.TemporaryDirectory() as tmp:
        create_kek(Path(tmp) / "keys", "bench")
        stores = {
            "plain": ModelStore(Path(tmp) / "plain"),
            "encrypted": ModelStore(Path(tmp) / "sealed", Keyring(Path(tmp) / "keys", "bench")),
        }
        for store in stores.values():
            store.copy_version(source, MINILM, 1)
        size = stores["encrypted"].manifest(MINILM, 1).size_bytes
        load_once(stores["plain"], config, settings.max_sequence_length)  # ONNX Runtime's own first-use costs
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in stores}
        for _ in range(ROUNDS):
            for name, store in stores.items():
                times[name].append(load_once(store, config, settings.max_sequence_length))
    medians = {
        name: (statistics.median(t for t, _ in runs), statistics.median(c for _, c in runs))
        for name, runs in times.items()
    }
    print(f"\n{MINILM} v1 ({size / 1e6:.1f} MB of artifacts): load time, median of {ROUNDS} loads each, "
          f"interleaved, {os.cpu_count()} cores")  # fmt: skip
    print(f"{'store':>9} | {'load ms':>8} {'read+check+decrypt ms':>22}")
    for name, (load_s, check_s) in medians.items():
        print(f"{name:>9} | {load_s * 1000:>8.0f} {check_s * 1000:>22.0f}")
    ratio = medians["encrypted"][0] / medians["plain"][0]
    verdict = "ok" if ratio <= TARGET else "MISSED"
    print(f"encrypted / plain: {ratio:.2f}x load time (target <= {TARGET}x): {verdict}")


if __name__ == "__main__":
    main()
