"""The graph store: versions open in constant time and are checked block by block as queries read them,
updates are stored as deltas that read exactly as a full rebuild, retention deletes old versions, and
sealed graphs are decrypted once into memory-only storage that every replica maps."""

import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest

from services.gnn.checked_array import BLOCK_BYTES
from services.gnn.generators import block_model_graph
from services.gnn.graph_store import GraphStore, GraphVersioning
from services.gnn.plaintext_cache import PlaintextCache
from services.gnn.sampling import csr_add_edges, sample_neighbourhood
from shared.errors import FailedPreconditionError, IntegrityError, NotFoundError
from shared.keyring import Keyring, create_kek
from shared.model_store import ModelStore

NODES = 4000


@pytest.fixture(scope="module")
def sbm():
    return block_model_graph(NODES, seed=5)


def publish(store: GraphStore, sbm, name: str = "g"):
    return store.publish_edges(name, sbm.edge_index, sbm.node_features, undirected=True)


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.chmod(0o644)
    path.write_bytes(bytes(data))


def test_opening_reads_one_block_per_file_and_a_query_checks_only_what_it_reads(tmp_path, sbm):
    store = GraphStore(ModelStore(tmp_path))
    publish(store, sbm)
    opened = GraphStore(ModelStore(tmp_path)).open("g")
    arrays = opened.layers[0].arrays
    assert opened.num_nodes == NODES and len(arrays["indices"].array) == opened.num_edges
    assert {name: int(array._checked.sum()) for name, array in arrays.items()} == dict.fromkeys(arrays, 1)
    sub = opened.sample(np.array([7]), [5, 5], np.random.default_rng(0))
    checked = int(arrays["indices"]._checked.sum())
    assert 1 < checked < len(arrays["indices"]._checked)  # the query read some blocks, not the graph
    reference = sample_neighbourhood(np.array(opened.indptr), np.array(opened.indices), np.array([7]), [5, 5],
                                     np.random.default_rng(0))  # fmt: skip
    np.testing.assert_array_equal(sub.nodes, reference.nodes)
    np.testing.assert_array_equal(opened.features(sub.nodes), sbm.node_features[sub.nodes])


def test_a_flipped_byte_is_refused_naming_the_graph_and_file_before_it_is_used(tmp_path, sbm):
    store = GraphStore(ModelStore(tmp_path))
    graph = publish(store, sbm)
    features = graph.layers[0].arrays["node_features"]
    row_bytes = features.row_bytes
    victim = NODES - 1  # its row lies in the file's last block
    flip(store.store.version_dir("g", 1) / "node_features.npy", features.offset + victim * row_bytes + 1)

    fresh = GraphStore(ModelStore(tmp_path)).open("g")  # opening does not read the rows
    safe = np.array([0, 1, 2])
    np.testing.assert_array_equal(fresh.features(safe), sbm.node_features[safe])
    for rows in ([5, victim], [5, victim], [-1]):  # refused every time, and however the row is named
        with pytest.raises(IntegrityError, match=r"graph 'g' v1: node_features.npy: block \d+ .* does not match"):
            fresh.features(np.array(rows))
    with pytest.raises(IntegrityError, match="node_features.npy"):
        fresh.node_features  # noqa: B018 (the whole array: every block checked)

    flip(store.store.version_dir("g", 1) / "indices.npy", 3)  # in the header: opening itself refuses
    with pytest.raises(IntegrityError, match="graph 'g' v1: indices.npy: block 0"):
        GraphStore(ModelStore(tmp_path)).open("g")


def test_a_file_cut_short_is_refused_at_open(tmp_path, sbm):
    store = GraphStore(ModelStore(tmp_path))
    publish(store, sbm)
    path = store.store.version_dir("g", 1) / "indices.npy"
    path.chmod(0o644)
    os.truncate(path, path.stat().st_size - BLOCK_BYTES)
    with pytest.raises(IntegrityError, match="indices.npy: .* cut short or grown"):
        GraphStore(ModelStore(tmp_path)).open("g")


def new_nodes(sbm, base_nodes: int, count: int, rng) -> tuple[np.ndarray, np.ndarray]:
    features = sbm.node_features[rng.integers(0, NODES, count)] + 0.5
    sources = np.repeat(np.arange(base_nodes, base_nodes + count), 3)
    old = rng.integers(0, base_nodes, 3 * count)
    extra = rng.integers(0, base_nodes, (2, 10))  # edges between existing nodes too
    return features.astype(np.float32), np.concatenate([np.stack([sources, old]), extra], axis=1).astype(np.int64)


def test_updates_are_deltas_that_read_exactly_as_a_full_rebuild_until_compaction(tmp_path, sbm):
    store = GraphStore(ModelStore(tmp_path), versioning=GraphVersioning(keep_versions=0, max_delta_chain=3))
    graph = publish(store, sbm)
    indptr, indices, features = np.array(graph.indptr), np.array(graph.indices), np.array(graph.node_features)
    rng = np.random.default_rng(1)
    for version in (2, 3, 4, 5):
        added, edges = new_nodes(sbm, len(features), 5, rng)
        updated = store.update("g", 0, added, edges)
        both = np.concatenate([edges, edges[::-1]], axis=1)
        indptr, indices = csr_add_edges(indptr, indices, both, len(features) + len(added))
        features = np.concatenate([features, added])
        assert updated.version == version and updated.num_nodes == len(features) and updated.num_edges == len(indices)
        written = {f.name: f.stat().st_size for f in store.store.version_dir("g", version).iterdir()}
        if version < 5:  # three deltas on v1: each version holds only its own rows and edges
            assert updated.base_version == version - 1 and "targets.npy" in written
            assert written["node_features.npy"] < 1000 and written["indptr.npy"] < 1000
        else:  # a fourth would pass max_delta_chain: compacted into a full version
            assert updated.base_version == 0 and "targets.npy" not in written
        reopened = GraphStore(ModelStore(tmp_path)).open("g", version)
        seeds = np.array([0, 17, len(features) - 1, len(features) - 3])
        for fan_outs in ([-1, -1], [3, 2]):
            sub = reopened.sample(seeds, fan_outs, np.random.default_rng(9))
            rebuilt = sample_neighbourhood(indptr, indices, seeds, fan_outs, np.random.default_rng(9))
            np.testing.assert_array_equal(sub.nodes, rebuilt.nodes)
            np.testing.assert_array_equal(sub.edge_index, rebuilt.edge_index)
            np.testing.assert_array_equal(reopened.features(sub.nodes), features[sub.nodes])
        np.testing.assert_array_equal(reopened.indptr, indptr)
        np.testing.assert_array_equal(reopened.indices, indices)
    old = GraphStore(ModelStore(tmp_path)).open("g", 1)  # the old version is still the old graph
    assert old.num_nodes == NODES
    np.testing.assert_array_equal(old.indptr, graph.indptr)


def test_retention_keeps_the_latest_versions_and_their_bases_and_deleted_versions_are_not_found(tmp_path, sbm):
    store = GraphStore(ModelStore(tmp_path), versioning=GraphVersioning(keep_versions=2))
    publish(store, sbm)
    rng = np.random.default_rng(2)
    for _ in range(3):
        added, edges = new_nodes(sbm, store.open("g").num_nodes, 2, rng)
        store.update("g", 0, added, edges)
    # v3 and v4 are kept; they are deltas on v2 (itself a delta on v1), so v1 and v2 are kept too.
    assert store.store.versions("g") == [1, 2, 3, 4] and store.open("g").base_version == 3
    with pytest.raises(FailedPreconditionError, match=r"v2 of graph 'g' is the base of delta versions \[3\]"):
        store.delete("g", 2)
    with pytest.raises(FailedPreconditionError, match="v4 is the latest version"):
        store.delete("g", 4)

    full = GraphStore(ModelStore(tmp_path), versioning=GraphVersioning(keep_versions=2, max_delta_chain=0))
    added, edges = new_nodes(sbm, full.open("g").num_nodes, 2, rng)
    assert full.update("g", 0, added, edges).base_version == 0  # a full v5: v4 is all retention keeps besides
    assert full.store.versions("g") == [1, 2, 3, 4, 5]  # ... and v4 needs v3, v2, v1
    full.update("g", 0, added[:1], np.zeros((2, 0), np.int64))
    assert full.store.versions("g") == [5, 6]
    assert not full.store.version_dir("g", 1).exists()
    with pytest.raises(NotFoundError, match=r"graph 'g' has no version 2; it has \[5, 6\]"):
        store.open("g", 2)  # another store object (replica) that had it open: gone there too
    assert full.delete("g", 5) == [6]
    assert full.open("g").num_nodes == NODES + 3 * 2 + 2 + 1


@pytest.fixture
def shm_dir():
    directory = Path("/dev/shm") / f"maas-test-{uuid.uuid4().hex[:8]}"
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm here")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def test_sealed_graphs_are_decrypted_once_into_memory_and_mapped_by_every_replica(tmp_path, sbm, shm_dir):
    create_kek(tmp_path / "keys", "a")

    def replica() -> GraphStore:
        return GraphStore(ModelStore(tmp_path / "models", Keyring(tmp_path / "keys", "a")),
                          plaintext=PlaintextCache.at(shm_dir))  # fmt: skip

    cache = PlaintextCache.at(shm_dir).directory
    publish(replica(), sbm)
    assert sbm.node_features.tobytes()[:4096] not in (replica().store.version_dir("g", 1) / "node_features.npy"
                                                      ).read_bytes()  # fmt: skip
    first, second = replica().open("g"), replica().open("g")
    copies = sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))
    assert len(copies) == 3 and oct(cache.stat().st_mode & 0o777) == "0o700"
    assert all((cache / name).stat().st_mode & 0o777 == 0o600 for name in copies)
    for graph in (first, second):
        mapped = graph.layers[0].arrays["node_features"].whole()
        assert isinstance(mapped, np.memmap) and Path(mapped.filename).parent == cache
        np.testing.assert_array_equal(mapped, sbm.node_features)

    features = first.layers[0].arrays["node_features"]
    copy = Path(features.whole().filename)
    original = copy.read_bytes()
    data = bytearray(original)
    data[features.offset + 3] ^= 1
    copy.write_bytes(bytes(data))  # same inode: a copy altered in place, under the maps of both replicas
    with pytest.raises(IntegrityError, match="graph 'g' v1: node_features.npy: block 0"):
        replica().open("g").features(np.array([0]))
    copy.write_bytes(original)

    added = np.ones((1, sbm.node_features.shape[1]), np.float32)
    store = GraphStore(ModelStore(tmp_path / "models", Keyring(tmp_path / "keys", "a")), plaintext=PlaintextCache.at(
        shm_dir), versioning=GraphVersioning(keep_versions=1, max_delta_chain=0))  # fmt: skip
    store.update("g", 0, added, np.array([[NODES], [0]]))
    assert store.store.versions("g") == [2]
    assert not any((cache / name).exists() for name in copies)  # v1's copies went with it


def test_a_plaintext_cache_on_persistent_disk_or_shared_with_others_is_refused(tmp_path, shm_dir):
    assert PlaintextCache.at(tmp_path / "cache") is None  # not tmpfs
    cache = PlaintextCache.at(shm_dir).directory
    cache.chmod(0o755)
    assert PlaintextCache.at(shm_dir) is None  # readable by others
    cache.rmdir()
    cache.symlink_to(tmp_path)
    assert PlaintextCache.at(shm_dir) is None  # a link planted in a shared parent
    cache.unlink()
    assert PlaintextCache.at(shm_dir) is not None


def test_a_version_written_before_block_lists_is_checked_whole_at_open(tmp_path, sbm):
    import io

    from services.gnn.sampling import csr_from_edges

    store = GraphStore(ModelStore(tmp_path))
    indptr, indices = csr_from_edges(sbm.edge_index, NODES)
    files = {}
    for name, array in (("indptr", indptr), ("indices", indices), ("node_features", sbm.node_features)):
        buffer = io.BytesIO()
        np.save(buffer, array)
        files[f"{name}.npy"] = buffer.getvalue()
    config = {"kind": "graph", "num_nodes": NODES, "num_edges": len(indices), "feature_width": 16,
              "undirected": False, "parent_version": 0}  # fmt: skip
    store.store.publish({"name": "old", "family": "gnn", "framework": "numpy", "inputs": [], "outputs": [],
                         "config": config}, files)  # fmt: skip
    opened = store.open("old")
    np.testing.assert_array_equal(opened.features(np.array([5])), sbm.node_features[[5]])
    assert opened.sample(np.array([1]), [-1], np.random.default_rng(0)).num_edges == indptr[2] - indptr[1]
    flip(store.store.version_dir("old", 1) / "node_features.npy", 1000)
    with pytest.raises(IntegrityError, match="old v1: node_features.npy does not match its sha256"):
        GraphStore(ModelStore(tmp_path)).open("old")
