"""k-hop neighbourhood sampling on a CSR graph, per-hop fan-out limits as in GraphSAGE.

torch_geometric's NeighborSampler needs pyg-lib or torch-sparse (neither has a wheel for the
pinned torch) and converts the whole graph to CSC when it is built, which is O(E) per graph
version; this sampler reads only the rows of the nodes it visits, straight from the memory-mapped
arrays, so a query costs its neighbourhood and not the graph. Everything is vectorised over the
frontier: no Python loop grows with the number of nodes.

Layout: `indices[indptr[v]:indptr[v + 1]]` are the nodes with an edge into v (its in-neighbours,
the nodes v aggregates from). Each node's neighbours are sampled once, when it first enters the
frontier, so with fan-outs that cover every neighbour the seeds' k-hop receptive field is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ALL = -1  # a fan-out that takes every neighbour


@dataclass
class Subgraph:
    """A sampled neighbourhood. `nodes` are global ids, the (unique) seeds first; `edge_index` is
    2 x E in local ids, row 0 the sources (neighbours) and row 1 the targets."""

    nodes: np.ndarray
    edge_index: np.ndarray
    # Where each requested node id sits in `nodes`, in request order.
    seed_positions: np.ndarray

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @property
    def num_edges(self) -> int:
        return self.edge_index.shape[1]


class NeighbourhoodTooLarge(ValueError):
    """The sampled neighbourhood passed the node limit before sampling finished."""


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenation of arange(s, s + n) for every (s, n), without a Python loop."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    offsets = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.int64) + np.repeat(starts - offsets, lengths)


def choose_without_replacement(degrees: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of k distinct offsets in [0, degree) for each degree (all > k), uniformly: Floyd's
    algorithm, one vectorised step per column."""
    n = len(degrees)
    chosen = np.empty((n, k), np.int64)
    for column in range(k):
        upper = degrees - k + column  # j in Floyd's algorithm
        pick = (rng.random(n) * (upper + 1)).astype(np.int64)
        taken = (chosen[:, :column] == pick[:, None]).any(axis=1) if column else np.zeros(n, bool)
        chosen[:, column] = np.where(taken, upper, pick)
    return chosen


class RowSpans:
    """Where the in-neighbours of some nodes lie: in one CSR, or in several layers read in order (a stored
    graph's base version, then each delta), so a node's row is its base row followed by its new edges."""

    def __init__(self, layers: list[tuple[np.ndarray, np.ndarray, object]]) -> None:
        # Per layer: the start of each node's part of its row in that layer's indices, its length, the indices.
        self.layers = layers
        self.degrees = sum((lengths for _, lengths, _ in layers), np.zeros(len(layers[0][0]), np.int64))

    def neighbours(self, rows: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """The neighbour at `offsets[i]` within the row of node `rows[i]` (rows index the spanned nodes)."""
        if len(self.layers) == 1:
            starts, _, indices = self.layers[0]
            return np.asarray(indices[starts[rows] + offsets], np.int64)
        out = np.empty(len(rows), np.int64)
        before = np.zeros(len(rows), np.int64)
        for starts, lengths, indices in self.layers:
            inside = (offsets >= before) & (offsets < before + lengths[rows])
            if inside.any():
                out[inside] = indices[starts[rows[inside]] + offsets[inside] - before[inside]]
            before += lengths[rows]
        return out


class Csr:
    """One CSR adjacency (indptr, indices): plain arrays, memory maps or checked arrays."""

    def __init__(self, indptr, indices) -> None:
        self.indptr, self.indices = indptr, indices

    def spans(self, nodes: np.ndarray) -> RowSpans:
        starts = np.asarray(self.indptr[nodes], np.int64)
        return RowSpans([(starts, np.asarray(self.indptr[nodes + 1], np.int64) - starts, self.indices)])


def sample_hop(
    adjacency: Csr, frontier: np.ndarray, fan_out: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(neighbour, target) pairs of global ids: up to `fan_out` in-neighbours of each frontier node."""
    spans = adjacency.spans(frontier)
    degrees = spans.degrees
    whole = degrees if fan_out == ALL else np.minimum(degrees, fan_out)
    everything = whole == degrees
    taken = np.flatnonzero(everything)
    rows = [np.repeat(taken, degrees[everything])]
    offsets = [ranges(np.zeros(len(taken), np.int64), degrees[everything])]
    if not everything.all():
        partial = np.flatnonzero(~everything)
        offsets.append(choose_without_replacement(degrees[partial], fan_out, rng).ravel())
        rows.append(np.repeat(partial, fan_out))
    row = np.concatenate(rows)
    return spans.neighbours(row, np.concatenate(offsets)), frontier[row]


class LocalIds:
    """Global -> local node ids for one subgraph, growing as hops discover nodes."""

    def __init__(self, seeds: np.ndarray) -> None:
        self.nodes = [seeds]
        self.count = len(seeds)
        order = np.argsort(seeds, kind="stable")
        self._sorted, self._local = seeds[order], order.astype(np.int64)

    def add(self, candidates: np.ndarray) -> np.ndarray:
        """Gives unseen candidates the next local ids; returns those new nodes (global ids)."""
        unique = np.unique(candidates)
        new = unique[~self.contains(unique)]
        if len(new):
            self.nodes.append(new)
            merged = np.concatenate([self._sorted, new])
            local = np.concatenate([self._local, np.arange(self.count, self.count + len(new), dtype=np.int64)])
            order = np.argsort(merged, kind="stable")
            self._sorted, self._local = merged[order], local[order]
            self.count += len(new)
        return new

    def contains(self, ids: np.ndarray) -> np.ndarray:
        at = np.searchsorted(self._sorted, ids)
        return (at < len(self._sorted)) & (self._sorted[np.minimum(at, len(self._sorted) - 1)] == ids)

    def local(self, ids: np.ndarray) -> np.ndarray:
        return self._local[np.searchsorted(self._sorted, ids)]


def sample_neighbourhood(
    indptr,
    indices,
    node_ids: np.ndarray,
    fan_outs: list[int],
    rng: np.random.Generator | None = None,
    max_nodes: int | None = None,
) -> Subgraph:
    """The len(fan_outs)-hop neighbourhood of `node_ids` in a CSR, fan_outs[h] neighbours per node at hop h."""
    return sample_adjacency(Csr(indptr, indices), node_ids, fan_outs, rng, max_nodes)


def sample_adjacency(
    adjacency: Csr,
    node_ids: np.ndarray,
    fan_outs: list[int],
    rng: np.random.Generator | None = None,
    max_nodes: int | None = None,
) -> Subgraph:
    """The len(fan_outs)-hop neighbourhood of `node_ids`, fan_outs[h] neighbours per node at hop h.

    Raises NeighbourhoodTooLarge as soon as it holds more than `max_nodes` nodes (or would, with
    the next hop's edges), so a query cannot make it read the whole graph."""
    rng = rng or np.random.default_rng()
    node_ids = np.asarray(node_ids, np.int64)
    seeds, inverse = np.unique(node_ids, return_inverse=True)
    ids = LocalIds(seeds)
    sources, targets = [], []
    frontier = seeds
    for fan_out in fan_outs:
        if not len(frontier):
            break
        if max_nodes is not None and fan_out == ALL:
            reach = int(adjacency.spans(frontier).degrees.sum())
            if ids.count + reach > 4 * max_nodes:  # bounds the edges read, not just the nodes kept
                raise NeighbourhoodTooLarge(f"hop {len(sources) + 1} reaches {reach} more edges")
        neighbours, hop_targets = sample_hop(adjacency, frontier, fan_out, rng)
        frontier = ids.add(neighbours)
        if max_nodes is not None and ids.count > max_nodes:
            raise NeighbourhoodTooLarge(f"{ids.count} nodes after hop {len(sources) + 1}")
        sources.append(neighbours)
        targets.append(hop_targets)
    nodes = np.concatenate(ids.nodes)
    if sources:
        edge_index = np.stack([ids.local(np.concatenate(sources)), ids.local(np.concatenate(targets))])
    else:
        edge_index = np.zeros((2, 0), np.int64)
    return Subgraph(nodes, edge_index, inverse.astype(np.int64).reshape(-1))


def csr_edge_index(indptr: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """The whole graph as a 2 x E (source, target) edge list: for full-graph passes on small graphs."""
    degrees = np.diff(np.asarray(indptr, np.int64))
    targets = np.repeat(np.arange(len(degrees), dtype=np.int64), degrees)
    return np.stack([np.asarray(indices, np.int64), targets])


def csr_from_edges(edge_index: np.ndarray, num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """(indptr, indices) grouping each edge under its target; sources keep their input order per target."""
    sources, targets = np.asarray(edge_index[0], np.int64), np.asarray(edge_index[1], np.int64)
    order = np.argsort(targets, kind="stable")
    indptr = np.zeros(num_nodes + 1, np.int64)
    np.cumsum(np.bincount(targets, minlength=num_nodes), out=indptr[1:])
    return indptr, sources[order]


def csr_add_edges(
    indptr: np.ndarray, indices: np.ndarray, new_edges: np.ndarray, num_nodes: int
) -> tuple[np.ndarray, np.ndarray]:
    """A new CSR of `num_nodes` nodes (>= the old count) holding the old edges and `new_edges`, in O(E):
    each target's old neighbours first, then its new ones; the old arrays are only read."""
    old_nodes = len(indptr) - 1
    old_degrees = np.zeros(num_nodes, np.int64)
    old_degrees[:old_nodes] = np.diff(np.asarray(indptr, np.int64))
    sources, targets = np.asarray(new_edges[0], np.int64), np.asarray(new_edges[1], np.int64)
    new_degrees = np.bincount(targets, minlength=num_nodes)
    merged = np.zeros(num_nodes + 1, np.int64)
    np.cumsum(old_degrees + new_degrees, out=merged[1:])
    out = np.empty(int(merged[-1]), indices.dtype)
    # Old edges move as whole rows: position shifts by how many new edges came before their target.
    shift = merged[:old_nodes] - np.asarray(indptr[:old_nodes], np.int64)
    old_positions = np.arange(len(indices), dtype=np.int64) + np.repeat(shift, old_degrees[:old_nodes])
    out[old_positions] = indices
    order = np.argsort(targets, kind="stable")
    sorted_targets = targets[order]
    first = np.searchsorted(sorted_targets, sorted_targets)  # first position of each target's group
    rank = np.arange(len(sorted_targets)) - first
    out[merged[sorted_targets] + old_degrees[sorted_targets] + rank] = sources[order]
    return merged, out
