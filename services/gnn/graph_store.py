"""Stored graphs: versioned CSR adjacency and node features, memory-mapped from the model store.

A graph is a model-store entry of its own, under `<model store>/_graphs/<name>/<version>/`
(`_` keeps it out of the model listing): `indptr.npy`, `indices.npy` and `node_features.npy`,
published by the store's atomic rename, with their sha256 in the manifest. Opening a version
checks the hashes by streaming each file once, then maps the arrays read-only: the process holds
no copy, replicas on one machine share the page cache's pages, and a query touches only the rows
it samples.

An update writes a new version (the old one is never changed), so a query that names a version
always gets the same graph, and caches keyed by version are never stale.

When the model store is encrypted at rest, graphs are sealed like every artifact: a sealed version
is checked and decrypted into the process's memory instead of mapped, so replicas do not share its
pages and opening it costs its size.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.gnn.sampling import csr_add_edges, csr_from_edges
from shared.errors import FailedPreconditionError, IntegrityError, InvalidArgumentError, NotFoundError
from shared.model_store import Manifest, ModelStore, check_model_name, sha256_file

GRAPHS_DIR = "_graphs"
ARRAYS = ("indptr", "indices", "node_features")


@dataclass
class StoredGraph:
    name: str
    version: int
    indptr: np.ndarray
    indices: np.ndarray
    node_features: np.ndarray
    undirected: bool

    @property
    def num_nodes(self) -> int:
        return len(self.indptr) - 1

    @property
    def num_edges(self) -> int:
        return len(self.indices)

    @property
    def feature_width(self) -> int:
        return self.node_features.shape[1]

    @property
    def label(self) -> str:
        return f"graph {self.name!r} v{self.version}"


@dataclass(frozen=True)
class GraphLimits:
    max_nodes: int = 50_000_000
    max_update_nodes: int = 100_000
    max_update_edges: int = 1_000_000


class GraphStore:
    def __init__(self, model_store: ModelStore, limits: GraphLimits | None = None, keep_open: int = 8) -> None:
        self.store = ModelStore(Path(model_store.root) / GRAPHS_DIR, model_store.keyring)
        self.limits = limits or GraphLimits()
        self.keep_open = keep_open
        self._open: OrderedDict[tuple[str, int], StoredGraph] = OrderedDict()
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return self.store.model_names()

    def latest(self, name: str) -> int:
        versions = self.store.versions(check_model_name(name, "stored_graph"))
        if not versions:
            raise NotFoundError(f"stored_graph: no stored graph {name!r}; the store has {self.names()}")
        return versions[-1]

    def open(self, name: str, version: int = 0) -> StoredGraph:
        """A version (0: the latest), mapped read-only. Blocking: call it off the event loop."""
        if version < 0:
            raise InvalidArgumentError(f"graph_version: must be 0 (latest) or positive, got {version}")
        version = version or self.latest(name)
        key = (name, version)
        with self._lock:
            graph = self._open.get(key)
            if graph is not None:
                self._open.move_to_end(key)
                return graph
        check_model_name(name, "stored_graph")
        try:
            manifest = self.store.manifest(name, version)
        except NotFoundError:
            raise NotFoundError(
                f"graph_version: graph {name!r} has no version {version}; it has {self.store.versions(name)}"
            ) from None
        graph = self._map(manifest)
        with self._lock:
            self._open[key] = graph
            while len(self._open) > self.keep_open:
                self._open.popitem(last=False)
        return graph

    def _map(self, manifest: Manifest) -> StoredGraph:
        directory = self.store.version_dir(manifest.name, manifest.version)
        arrays = {}
        if manifest.sealed:
            artifacts = self.store.artifacts(manifest).check_all()  # sha256 over the ciphertext, then decrypted
            for array in ARRAYS:
                arrays[array] = np.load(io.BytesIO(artifacts.read(f"{array}.npy")), allow_pickle=False)
        for array in () if manifest.sealed else ARRAYS:
            file_name = f"{array}.npy"
            path = manifest.artifact(directory, file_name)
            if sha256_file(path) != manifest.files[file_name]:
                raise IntegrityError(
                    f"graph {manifest.name} v{manifest.version}: {file_name} does not match its sha256"
                )
            arrays[array] = np.load(path, mmap_mode="r", allow_pickle=False)
        return StoredGraph(manifest.name, manifest.version, undirected=bool(manifest.config["undirected"]), **arrays)

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
    ) -> StoredGraph:
        check_model_name(name, "graph_name")
        files = {}
        for array, value in (("indptr", indptr), ("indices", indices), ("node_features", node_features)):
            buffer = io.BytesIO()  # in memory: the store writes it, sealed when it is encrypted
            np.save(buffer, np.ascontiguousarray(value))
            files[f"{array}.npy"] = buffer.getvalue()
        manifest = self.store.publish(
            {
                "name": name,
                "family": "gnn",
                "framework": "numpy",
                "inputs": [],
                "outputs": [],
                "description": description,
                "config": {
                    "kind": "graph",
                    "layout": "CSR by target: indices[indptr[v]:indptr[v+1]] are the in-neighbours of v",
                    "num_nodes": len(indptr) - 1,
                    "num_edges": len(indices),
                    "feature_width": int(node_features.shape[1]),
                    "undirected": undirected,
                    "parent_version": parent,
                },
            },
            files,
            expected_latest=expected_latest,
        )
        return self.open(name, manifest.version)

    def publish_edges(
        self, name: str, edge_index: np.ndarray, node_features: np.ndarray, undirected: bool, description: str = ""
    ) -> StoredGraph:
        """A new graph (or version) from an edge list; an undirected graph lists each edge once."""
        if undirected:
            edge_index = np.concatenate([edge_index, edge_index[::-1]], axis=1)
        indptr, indices = csr_from_edges(edge_index, len(node_features))
        return self.publish(name, indptr, indices, node_features, undirected, description)

    def update(self, name: str, base_version: int, node_features: np.ndarray, edge_index: np.ndarray) -> StoredGraph:
        """A new version: the base version plus new nodes (ids N..N+M-1) and new edges.

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
        num_nodes = base.num_nodes + len(node_features)
        if base.undirected:
            edge_index = np.concatenate([edge_index, edge_index[::-1]], axis=1)
        indptr, indices = csr_add_edges(base.indptr, base.indices, edge_index, num_nodes)
        features = np.concatenate([base.node_features, node_features]) if len(node_features) else base.node_features
        return self.publish(
            name, indptr, indices, features, base.undirected, f"v{base.version} + {len(node_features)} nodes, "
            f"{edge_index.shape[1]} edges", parent=base.version, expected_latest=base.version,
        )  # fmt: skip

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
