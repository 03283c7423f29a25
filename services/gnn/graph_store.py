"""Stored graphs: versioned CSR adjacency and node features, memory-mapped from the model store.

A graph is a model-store entry of its own, under `<model store>/_graphs/<name>/<version>/`
(`_` keeps it out of the model listing), published by the store's atomic rename. A version is either

- **full**: `indptr.npy`, `indices.npy` and `node_features.npy`, the whole CSR; or
- **a delta** on a base version (an update): `targets.npy` (the nodes that gain in-edges, sorted),
  `indptr.npy` and `indices.npy` (their new in-neighbours, CSR over `targets`) and `node_features.npy`
  (the new nodes' rows only). A node's row is its base row followed by its new edges, exactly the row
  a full rebuild gives it; past a threshold (`GraphVersioning`) an update writes a full version instead.

**Integrity in O(1).** Every version has `blocks.sha256`, the sha256 of each 64 KiB block of each array
file, listed in the manifest (so the manifest's hash covers it). Opening a version reads that list and
each file's first block; a query checks a block the first time it reads from it (`CheckedArray`), so
opening costs the same for every graph size, and a changed byte is refused, naming the graph, file and
block, before it reaches an answer. Versions written before the block lists are checked whole at open.

**Sharing.** Plain versions are mapped straight from the store: replicas share the page cache's pages.
Sealed versions (an encrypted store) are decrypted once per machine into a memory-only directory
(`PlaintextCache`) that every replica maps; without one, into each process's memory.

Versions are immutable, so a query that names a version always gets the same graph, and caches keyed by
version are never stale. Retention keeps the latest `keep_versions` (and the bases they need); a deleted
version answers NOT_FOUND, naming the versions that exist.
"""

from __future__ import annotations

import io
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.gnn.checked_array import BLOCK_BYTES, DIGEST_BYTES, CheckedArray, block_digests
from services.gnn.plaintext_cache import PlaintextCache
from services.gnn.sampling import RowSpans, Subgraph, csr_add_edges, csr_from_edges, sample_adjacency
from shared.errors import FailedPreconditionError, IntegrityError, InvalidArgumentError, MaasError, NotFoundError
from shared.model_store import Manifest, ModelStore, check_model_name, sha256_file
from shared.stored_graphs import missing_graph

log = logging.getLogger(__name__)

GRAPHS_DIR = "_graphs"
ARRAYS = ("indptr", "indices", "node_features")
DELTA_ARRAYS = ("targets", "indptr", "indices", "node_features")
BLOCK_LIST = "blocks.sha256"


def _whole(array: Any) -> np.ndarray:
    return array.whole() if isinstance(array, CheckedArray) else array


@dataclass
class GraphLayer:
    """One version's own arrays: a full version's whole graph, or a delta's new edges and new nodes."""

    version: int
    first_node: int  # the id of its first own node (0 for a full version)
    num_nodes: int  # the graph's node count once this layer is on
    arrays: dict[str, Any]  # CheckedArray, or (versions before block lists) numpy arrays

    @property
    def delta(self) -> bool:
        return "targets" in self.arrays

    @property
    def num_edges(self) -> int:
        return len(self.arrays["indices"])

    def spans(self, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray, Any]:
        """(start, length) of each node's part of its row in this layer's indices (length 0: none)."""
        indptr, indices = self.arrays["indptr"], self.arrays["indices"]
        starts, lengths = np.zeros(len(nodes), np.int64), np.zeros(len(nodes), np.int64)
        if self.delta:
            targets = _whole(self.arrays["targets"])  # small: a delta is bounded by the compaction threshold
            at = np.searchsorted(targets, nodes)
            hit = at < len(targets)
            hit[hit] = targets[at[hit]] == nodes[hit]
            rows = at[hit]
        else:
            hit = nodes < self.num_nodes
            rows = nodes[hit]
        if hit.any():
            starts[hit] = indptr[rows]
            lengths[hit] = np.asarray(indptr[rows + 1], np.int64) - starts[hit]
        return starts, lengths, indices


class StoredGraph:
    """One version of a stored graph: its layers (a full version, then the deltas on it, in order)."""

    def __init__(self, name: str, version: int, undirected: bool, layers: list[GraphLayer], num_edges: int) -> None:
        self.name, self.version, self.undirected, self.layers = name, version, undirected, layers
        self.num_edges = num_edges
        self._merged: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._lock = threading.Lock()

    @property
    def num_nodes(self) -> int:
        return self.layers[-1].num_nodes

    @property
    def feature_width(self) -> int:
        return self.layers[0].arrays["node_features"].shape[1]

    @property
    def label(self) -> str:
        return f"graph {self.name!r} v{self.version}"

    @property
    def base_version(self) -> int:
        """The version this delta is on (0: a full version)."""
        return self.layers[-2].version if len(self.layers) > 1 else 0

    # Neighbourhoods: what a query reads, block by block.

    def spans(self, nodes: np.ndarray) -> RowSpans:
        return RowSpans([layer.spans(nodes) for layer in self.layers])

    def sample(
        self, node_ids: np.ndarray, fan_outs: list[int], rng: np.random.Generator, max_nodes: int | None = None
    ) -> Subgraph:
        return sample_adjacency(self, node_ids, fan_outs, rng, max_nodes)

    def features(self, nodes: np.ndarray) -> np.ndarray:
        """The feature rows of `nodes` (global ids), from the layer that added each."""
        nodes = np.asarray(nodes, np.int64)
        if len(self.layers) == 1:
            return self.layers[0].arrays["node_features"][nodes]
        out = np.empty((len(nodes), self.feature_width), np.float32)
        owner = np.searchsorted([layer.first_node for layer in self.layers], nodes, side="right") - 1
        for i, layer in enumerate(self.layers):
            mine = owner == i
            if mine.any():
                out[mine] = layer.arrays["node_features"][nodes[mine] - layer.first_node]
        return out

    # The whole graph: for full-graph passes on small graphs, and for compaction.

    @property
    def indptr(self) -> np.ndarray:
        return self._whole()[0]

    @property
    def indices(self) -> np.ndarray:
        return self._whole()[1]

    @property
    def node_features(self) -> np.ndarray:
        return self._whole()[2]

    def _whole(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if len(self.layers) == 1:  # the mapping itself, every block checked
            arrays = self.layers[0].arrays
            return _whole(arrays["indptr"]), _whole(arrays["indices"]), _whole(arrays["node_features"])
        with self._lock:
            if self._merged is None:
                base = self.layers[0].arrays
                indptr, indices = _whole(base["indptr"]), _whole(base["indices"])
                features = [_whole(base["node_features"])]
                for layer in self.layers[1:]:
                    targets, delta_indptr = _whole(layer.arrays["targets"]), _whole(layer.arrays["indptr"])
                    edges = np.stack([_whole(layer.arrays["indices"]), np.repeat(targets, np.diff(delta_indptr))])
                    indptr, indices = csr_add_edges(indptr, indices, edges, layer.num_nodes)
                    features.append(_whole(layer.arrays["node_features"]))
                self._merged = indptr, indices, np.concatenate(features)
            return self._merged


@dataclass(frozen=True)
class GraphLimits:
    max_nodes: int = 50_000_000
    max_update_nodes: int = 100_000
    max_update_edges: int = 1_000_000


@dataclass(frozen=True)
class GraphVersioning:
    """How updates are stored and how long versions are kept."""

    keep_versions: int = 10  # the latest N versions of each graph (and the bases they need); 0 keeps every one
    max_delta_chain: int = 8  # deltas on one full version before an update writes a full version
    compact_fraction: float = 0.1  # ... or once the deltas hold this fraction of the full version's nodes + edges


class GraphStore:
    def __init__(
        self,
        model_store: ModelStore,
        limits: GraphLimits | None = None,
        keep_open: int = 8,
        versioning: GraphVersioning | None = None,
        plaintext: PlaintextCache | None = None,
    ) -> None:
        self.store = ModelStore(Path(model_store.root) / GRAPHS_DIR, model_store.keyring)
        self.limits = limits or GraphLimits()
        self.versioning = versioning or GraphVersioning()
        self.plaintext = plaintext  # None: sealed versions are decrypted into this process's memory
        self.keep_open = keep_open
        self._open: OrderedDict[tuple[str, int], StoredGraph] = OrderedDict()
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return self.store.model_names()

    def versions(self, name: str) -> list[int]:
        versions = self.store.versions(check_model_name(name, "stored_graph"))
        if not versions:
            raise missing_graph(name)  # names no other graph: some may be private
        return versions

    def latest(self, name: str) -> int:
        return self.versions(name)[-1]

    def owner(self, name: str) -> str:
        """The tenant a private graph belongs to (its latest version's manifest says); "" when public."""
        return self.store.manifest(name, self.latest(name)).owner

    def open(self, name: str, version: int = 0) -> StoredGraph:
        """A version (0: the latest), mapped read-only. Blocking: call it off the event loop."""
        if version < 0:
            raise InvalidArgumentError(f"graph_version: must be 0 (latest) or positive, got {version}")
        versions = self.versions(name)  # read every time: a version deleted by another process is gone here too
        version = version or versions[-1]
        if version not in versions:
            raise NotFoundError(f"graph_version: graph {name!r} has no version {version}; it has {versions}")
        key = (name, version)
        with self._lock:
            graph = self._open.get(key)
            if graph is not None:
                self._open.move_to_end(key)
                return graph
        try:
            manifest = self.store.manifest(name, version)
            graph = self._load(manifest)
        except NotFoundError:
            raise NotFoundError(
                f"graph_version: graph {name!r} has no version {version}; it has {self.store.versions(name)}"
            ) from None
        with self._lock:
            self._open[key] = graph
            while len(self._open) > self.keep_open:
                self._open.popitem(last=False)
        return graph

    def _load(self, manifest: Manifest) -> StoredGraph:
        config = manifest.config
        base = config.get("base_version", 0)
        layers = list(self.open(manifest.name, base).layers) if base else []
        first_node = layers[-1].num_nodes if layers else 0
        arrays = self._arrays(manifest) if "blocks" in config else self._arrays_checked_whole(manifest)
        layer = GraphLayer(manifest.version, first_node, int(config["num_nodes"]), arrays)
        return StoredGraph(manifest.name, manifest.version, bool(config["undirected"]), [*layers, layer],
                           int(config["num_edges"]))  # fmt: skip

    def _arrays(self, manifest: Manifest) -> dict[str, CheckedArray]:
        """The version's arrays, mapped; each block checked when first read."""
        label = f"graph {manifest.name!r} v{manifest.version}"
        directory = self.store.version_dir(manifest.name, manifest.version)
        artifacts = self.store.artifacts(manifest)
        if manifest.sealed:
            digests = artifacts.read(BLOCK_LIST)  # sha256 over the ciphertext, then decrypted
        else:
            path = manifest.artifact(directory, BLOCK_LIST)
            try:
                digests = path.read_bytes()
            except FileNotFoundError:
                raise IntegrityError(f"{label}: {BLOCK_LIST} is missing") from None
            if sha256_file(path) != manifest.files[BLOCK_LIST]:
                raise IntegrityError(f"{label}: {BLOCK_LIST} does not match its sha256")
        block_bytes = int(manifest.config["block_bytes"])
        arrays = {}
        for file_name, (first, count) in manifest.config["blocks"].items():
            mine = digests[first * DIGEST_BYTES : (first + count) * DIGEST_BYTES]
            source: Path | bytes
            if not manifest.sealed:
                source = manifest.artifact(directory, file_name)
            elif self.plaintext is None:
                source = artifacts.read(file_name)
            else:
                try:
                    source = self.plaintext.get_or_write(f"{manifest.files[file_name]}.npy",
                                                         lambda f=file_name: artifacts.read(f))  # fmt: skip
                except OSError as exc:  # e.g. the tmpfs is full: this process decrypts its own copy
                    log.warning("%s: %s not shared through %s (%s); decrypted into this process",
                                label, file_name, self.plaintext.directory, exc)  # fmt: skip
                    source = artifacts.read(file_name)
            # Decrypted here, the bytes were just authenticated whole (GCM): no block needs checking again.
            trusted = isinstance(source, bytes)
            arrays[file_name.removesuffix(".npy")] = CheckedArray(source, mine, f"{label}: {file_name}", block_bytes,
                                                                  trusted)  # fmt: skip
        return arrays

    def _arrays_checked_whole(self, manifest: Manifest) -> dict[str, np.ndarray]:
        """A version written before block lists: every file checked whole, then mapped (sealed: decrypted)."""
        directory = self.store.version_dir(manifest.name, manifest.version)
        arrays = {}
        if manifest.sealed:
            artifacts = self.store.artifacts(manifest).check_all()  # sha256 over the ciphertext, then decrypted
            for array in ARRAYS:
                arrays[array] = np.load(io.BytesIO(artifacts.read(f"{array}.npy")), allow_pickle=False)
            return arrays
        for array in ARRAYS:
            file_name = f"{array}.npy"
            path = manifest.artifact(directory, file_name)
            if sha256_file(path) != manifest.files[file_name]:
                raise IntegrityError(
                    f"graph {manifest.name} v{manifest.version}: {file_name} does not match its sha256"
                )
            arrays[array] = np.load(path, mmap_mode="r", allow_pickle=False)
        return arrays

    def publish(
        self,
        name: str,
        indptr: np.ndarray,
        indices: np.ndarray,
        node_features: np.ndarray,
        undirected: bool,
        description: str = "",
        parent: int = 0,
        expected_latest: int | None = None,
        owner: str = "",
    ) -> StoredGraph:
        """A new full version (of a graph private to `owner`, when there is one)."""
        config = {
            "layout": "CSR by target: indices[indptr[v]:indptr[v+1]] are the in-neighbours of v",
            "num_nodes": len(indptr) - 1,
            "num_edges": len(indices),
            "feature_width": int(node_features.shape[1]),
            "undirected": undirected,
            "parent_version": parent,
        }
        arrays = {"indptr": indptr, "indices": indices, "node_features": node_features}
        return self._publish(name, arrays, config, description, expected_latest, owner)

    def _publish(
        self, name: str, arrays: dict[str, np.ndarray], config: dict[str, Any], description: str,
        expected_latest: int | None, owner: str = "",
    ) -> StoredGraph:  # fmt: skip
        check_model_name(name, "graph_name")
        files: dict[str, Path | bytes] = {}
        digests, blocks = [], {}
        for array, value in arrays.items():
            buffer = io.BytesIO()  # in memory: the store writes it, sealed when it is encrypted
            np.save(buffer, np.ascontiguousarray(value))
            data = buffer.getvalue()
            files[f"{array}.npy"] = data
            digests.append(block_digests(data))
            first = sum(len(d) for d in digests[:-1]) // DIGEST_BYTES
            blocks[f"{array}.npy"] = [first, len(digests[-1]) // DIGEST_BYTES]
        files[BLOCK_LIST] = b"".join(digests)
        manifest = self.store.publish(
            {
                "name": name,
                "family": "gnn",
                "framework": "numpy",
                "inputs": [],
                "outputs": [],
                "description": description,
                # Extensible: fields other writers add (e.g. an owner) pass through every version.
                "config": {"kind": "graph", **config, "block_bytes": BLOCK_BYTES, "blocks": blocks},
                "owner": owner,  # as a private model's: sealed under the tenant's key where it has one
            },
            files,
            expected_latest=expected_latest,
        )
        try:
            self.prune(name)
        except (MaasError, OSError) as exc:  # the new version stands; retention tries again after the next one
            log.warning("graph %s: retention failed after v%d: %s", name, manifest.version, exc)
        return self.open(name, manifest.version)

    def publish_edges(
        self, name: str, edge_index: np.ndarray, node_features: np.ndarray, undirected: bool, description: str = ""
    ) -> StoredGraph:
        """A new graph (or version) from an edge list; an undirected graph lists each edge once."""
        if undirected:
            edge_index = np.concatenate([edge_index, edge_index[::-1]], axis=1)
        indptr, indices = csr_from_edges(edge_index, len(node_features))
        return self.publish(name, indptr, indices, node_features, undirected, description)

    def update(self, name: str, base_version: int, node_features: np.ndarray, edge_index: np.ndarray,
               new_name: str = "", owner: str = "") -> StoredGraph:  # fmt: skip
        """A new version: the base version plus new nodes (ids N..N+M-1) and new edges, written as a delta on
        the base (only the new rows and edges), or as a full version once the deltas pass the threshold. An
        update keeps the graph's owner. With `new_name`: version 1 of a new graph of that name, in full,
        belonging to `owner`.

        Fails with FAILED_PRECONDITION if base_version is given and is no longer the latest, so two
        concurrent updates never silently drop one another.
        """
        latest = self.latest(name)
        base = self.open(name, base_version or latest)
        if base_version and base_version != latest:
            raise FailedPreconditionError(
                f"base_version: graph {name!r} is at v{latest}, not v{base_version}; update the latest version"
            )
        self.check_update(base, node_features, edge_index)
        node_features = node_features.reshape(-1, base.feature_width)
        num_nodes = base.num_nodes + len(node_features)
        if base.undirected:
            edge_index = np.concatenate([edge_index, edge_index[::-1]], axis=1)
        description = f"v{base.version} + {len(node_features)} nodes, {edge_index.shape[1]} edges"
        if new_name or self._compacts(base, len(node_features), edge_index.shape[1]):
            indptr, indices = csr_add_edges(base.indptr, base.indices, edge_index, num_nodes)
            features = np.concatenate([base.node_features, node_features]) if len(node_features) else base.node_features
            if new_name:
                return self.publish(new_name, indptr, indices, features, base.undirected, f"{name} {description}",
                                    expected_latest=0, owner=owner)  # fmt: skip
            return self.publish(name, indptr, indices, features, base.undirected, f"{description}, compacted",
                                parent=base.version, expected_latest=base.version, owner=self.owner(name))  # fmt: skip
        sources, targets = np.asarray(edge_index[0], np.int64), np.asarray(edge_index[1], np.int64)
        order = np.argsort(targets, kind="stable")  # per target, the edges keep their order: as a rebuild has them
        touched, counts = np.unique(targets[order], return_counts=True)
        arrays = {
            "targets": touched,
            "indptr": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            "indices": sources[order],
            "node_features": node_features,
        }
        config = {
            "layout": "delta on base_version: targets[i] gains in-neighbours indices[indptr[i]:indptr[i+1]], after "
            "its base row; nodes first_new_node.. are new, with node_features rows in order",
            "num_nodes": num_nodes,
            "num_edges": base.num_edges + edge_index.shape[1],
            "feature_width": base.feature_width,
            "undirected": base.undirected,
            "parent_version": base.version,
            "base_version": base.version,
            "first_new_node": base.num_nodes,
        }
        return self._publish(name, arrays, config, description, expected_latest=base.version, owner=self.owner(name))

    def _compacts(self, base: StoredGraph, new_nodes: int, new_edges: int) -> bool:
        """Whether an update on `base` writes a full version: its delta chain would be too long, or too big."""
        full, deltas = base.layers[0], base.layers[1:]
        if len(deltas) + 1 > self.versioning.max_delta_chain:
            return True
        delta_size = sum(layer.num_edges for layer in deltas) + new_edges + base.num_nodes - full.num_nodes + new_nodes
        return delta_size > self.versioning.compact_fraction * (full.num_nodes + full.num_edges)

    # Retention

    def _base_of(self, name: str, version: int) -> int:
        return int(self.store.manifest(name, version).config.get("base_version", 0))

    def prune(self, name: str) -> list[int]:
        """Deletes the versions retention no longer keeps: all but the latest `keep_versions` and the delta
        bases those need. Returns the versions deleted."""
        keep_count = self.versioning.keep_versions
        versions = self.store.versions(name)
        if not keep_count or len(versions) <= keep_count:
            return []
        keep = set(versions[-keep_count:])
        for version in sorted(keep):
            base = self._base_of(name, version)
            while base and base not in keep:
                keep.add(base)
                base = self._base_of(name, base)
        deleted = [version for version in versions if version not in keep]
        for version in deleted:
            self._delete(name, version)
        if deleted:
            log.info("graph %s: retention (the latest %d versions) deleted versions %s", name, keep_count, deleted)
        return deleted

    def delete(self, name: str, version: int) -> list[int]:
        """Deletes one version; returns the versions left. The latest version, and a version that a delta
        still builds on, are refused with FAILED_PRECONDITION."""
        versions = self.versions(name)
        if version not in versions:
            raise NotFoundError(f"graph_version: graph {name!r} has no version {version}; it has {versions}")
        if version == versions[-1]:
            raise FailedPreconditionError(
                f"graph_version: v{version} is the latest version of graph {name!r}, which is never deleted"
            )
        dependants = [v for v in versions if v > version and self._base_of(name, v) == version]
        if dependants:
            raise FailedPreconditionError(
                f"graph_version: v{version} of graph {name!r} is the base of delta versions {dependants}; "
                "delete those first"
            )
        self._delete(name, version)
        return self.store.versions(name)

    def _delete(self, name: str, version: int) -> None:
        manifest = self.store.manifest(name, version)
        self.store.delete_version(name, version)
        with self._lock:
            self._open.pop((name, version), None)
        if self.plaintext is not None and manifest.sealed:
            self.plaintext.remove([f"{manifest.files[f]}.npy" for f in manifest.files if f.endswith(".npy")])

    def check_update(self, base: StoredGraph, node_features: np.ndarray, edge_index: np.ndarray) -> None:
        width = base.feature_width
        if (
            node_features.dtype != np.float32
            or node_features.ndim != 2
            or (len(node_features) and node_features.shape[1] != width)
        ):
            raise InvalidArgumentError(
                f"node_features: expected FP32 of shape [M, {width}] ({base.label} has {width} features per node), "
                f"got {node_features.dtype} of shape {list(node_features.shape)}"
            )
        if len(node_features) > self.limits.max_update_nodes:
            raise InvalidArgumentError(
                f"node_features: {len(node_features)} new nodes; at most {self.limits.max_update_nodes} per update"
            )
        if base.num_nodes + len(node_features) > self.limits.max_nodes:
            raise InvalidArgumentError(
                f"node_features: the graph would have {base.num_nodes + len(node_features)} nodes; "
                f"at most {self.limits.max_nodes}"
            )
        if edge_index.dtype != np.int64 or edge_index.ndim != 2 or edge_index.shape[0] != 2:
            raise InvalidArgumentError(
                f"edge_index: expected INT64 of shape [2, E], got {edge_index.dtype} of shape {list(edge_index.shape)}"
            )
        if edge_index.shape[1] > self.limits.max_update_edges:
            raise InvalidArgumentError(
                f"edge_index: {edge_index.shape[1]} new edges; at most {self.limits.max_update_edges} per update"
            )
        num_nodes = base.num_nodes + len(node_features)
        if edge_index.size and (edge_index.min() < 0 or edge_index.max() >= num_nodes):
            bad = int(edge_index.min() if edge_index.min() < 0 else edge_index.max())
            raise InvalidArgumentError(
                f"edge_index: node {bad} does not exist; after this update the graph has nodes 0..{num_nodes - 1} "
                f"({base.num_nodes} in {base.label} plus {len(node_features)} new)"
            )
        if not len(node_features) and not edge_index.size:
            raise InvalidArgumentError("node_features, edge_index: the update adds nothing")
