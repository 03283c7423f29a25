"""Collaborative filtering on a bipartite user-item graph: interaction data sets (a planted-community
one, and uploads), a LightGCN trained with BPR loss, recall@k / NDCG@k on a seeded leave-last-out split
against a popularity baseline on the same split, and serving: top-k items per user and similar items.

**The graph.** A recommender's user-item graph is a stored graph like any other (`graph_store`): users
are nodes 0..U-1 and items U..U+I-1 when it is made, each interaction one undirected edge. Node feature
column 0 says what a node is (1.0 an item, 0.0 a user); the other columns are the item's content vector
(an nlp embedding, L2-normalised; zeros for users and for items without one). UpdateGraph adds users,
items and interactions as for any graph: a new node is a user or an item by its column 0.

**Serving without retraining.** A version holds LightGCN's layer-0 embedding of every node it was
trained on. An answer on a graph version propagates those embeddings over that version's edges
(LightGCN's own `get_embedding`), with zeros for the nodes added since: a new user's embedding is then
made from the items it interacted with, and a new interaction moves the next answer. The propagated
table is built once per (version, graph version) and kept (`tables`); graph versions are immutable, so
a table never goes stale. A user with no interactions at all gets the items by popularity (their
degree in that graph version), and the answer says so.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.torch import load
from torch_geometric.nn import LightGCN

from shared.errors import InvalidArgumentError

ITEM_COLUMN = 0  # node feature column 0: 1.0 for an item, 0.0 for a user
TABLES_KEPT = 4  # propagated tables kept per version: the latest graph versions asked for


@dataclass
class Interactions:
    num_users: int
    num_items: int
    train: np.ndarray  # 2 x E_train (user, item)
    test: np.ndarray  # 2 x U_test (user, item): each user's last interaction, held out
    item_features: np.ndarray | None = None  # I x D content vectors (rows of zeros: none)
    item_texts: list[str] | None = None

    task = "ranking"

    @property
    def num_examples(self) -> int:
        return self.train.shape[1] + self.test.shape[1]

    @property
    def class_names(self) -> list[str]:
        return []  # a recommender ranks items; it has no classes

    def all_pairs(self) -> np.ndarray:
        return np.concatenate([self.train, self.test], axis=1)


COMMUNITY_WORDS = (
    ("jazz", "saxophone", "swing", "trumpet", "bebop", "quartet"),
    ("hiking", "trail", "mountain", "backpack", "summit", "tent"),
    ("baking", "bread", "oven", "flour", "pastry", "sourdough"),
    ("chess", "opening", "endgame", "gambit", "rook", "tournament"),
    ("gardening", "tomato", "compost", "seedling", "pruning", "soil"),
    ("astronomy", "telescope", "galaxy", "nebula", "orbit", "comet"),
)


def planted_interactions(
    num_users: int = 600,
    num_items: int = 300,
    num_communities: int = 6,
    per_user: int = 20,
    in_community: float = 0.85,
    seed: int = 0,
) -> Interactions:
    """Users and items each belong to one community; a user's interactions fall in its own
    community's items with probability `in_community`, otherwise anywhere (weighted by a
    Zipf-like popularity so the popularity baseline is a fair one). Each user's last draw is
    held out (leave-last-out), seeded. Each item gets a short text from its community's words
    (for content vectors).
    """
    rng = np.random.default_rng(seed)
    user_comm = rng.integers(0, num_communities, num_users)
    item_comm = np.arange(num_items) % num_communities
    popularity = 1.0 / np.arange(1, num_items + 1) ** 0.5
    popularity = popularity[rng.permutation(num_items)]
    pairs_u, pairs_i = [], []
    test_u, test_i = [], []
    p_all = popularity / popularity.sum()
    for u in range(num_users):
        own = np.flatnonzero(item_comm == user_comm[u])
        p_own = popularity[own] / popularity[own].sum()
        items: list[int] = []
        while len(items) < per_user:
            pool, p = (own, p_own) if rng.random() < in_community else (np.arange(num_items), p_all)
            it = int(rng.choice(pool, p=p))
            if it not in items:
                items.append(it)
        pairs_u += [u] * (per_user - 1)
        pairs_i += items[:-1]
        test_u.append(u)
        test_i.append(items[-1])
    texts = []
    for i in range(num_items):
        words = COMMUNITY_WORDS[item_comm[i] % len(COMMUNITY_WORDS)]
        chosen = rng.choice(len(words), 3, replace=False)
        texts.append(f"item {i}: " + " ".join(words[j] for j in chosen))
    return Interactions(
        num_users,
        num_items,
        np.array([pairs_u, pairs_i], np.int64),
        np.array([test_u, test_i], np.int64),
        item_texts=texts,
    )


def leave_last_out(user_ids: np.ndarray, item_ids: np.ndarray, num_users: int, num_items: int,
                   item_features: np.ndarray | None = None) -> Interactions:  # fmt: skip
    """Each user's last interaction (in the order given) held out, for users with two or more;
    repeated (user, item) pairs count once."""
    pairs = np.stack([np.asarray(user_ids, np.int64), np.asarray(item_ids, np.int64)])
    _, first = np.unique(pairs, axis=1, return_index=True)
    pairs = pairs[:, np.sort(first)]
    users = pairs[0]
    last = np.full(num_users, -1, np.int64)
    last[users] = np.arange(len(users))  # the last position of each user (later positions overwrite)
    counts = np.bincount(users, minlength=num_users)
    held = last[(counts >= 2)]
    mask = np.zeros(len(users), bool)
    mask[held] = True
    return Interactions(num_users, num_items, pairs[:, ~mask], pairs[:, mask], item_features)


def bipartite_edge_index(num_users: int, pairs: np.ndarray) -> torch.Tensor:
    """Both directions of every (user, item) pair, items offset by num_users."""
    u = torch.as_tensor(pairs[0])
    i = torch.as_tensor(pairs[1]) + num_users
    return torch.stack([torch.cat([u, i]), torch.cat([i, u])])


def node_features(data: Interactions) -> np.ndarray:
    """[U + I, 1 + D]: column 0 the item flag, then each item's content vector, L2-normalised."""
    width = 0 if data.item_features is None else data.item_features.shape[1]
    features = np.zeros((data.num_users + data.num_items, 1 + width), np.float32)
    features[data.num_users :, ITEM_COLUMN] = 1.0
    if width:
        content = np.asarray(data.item_features, np.float32)
        norms = np.linalg.norm(content, axis=1, keepdims=True)
        features[data.num_users :, 1:] = np.divide(content, norms, out=np.zeros_like(content), where=norms > 0)
    return features


def bpr_epoch(model: LightGCN, optimizer: torch.optim.Optimizer, data: Interactions, batch_size: int, seed: int):
    """One epoch's step for `shared.training.run_epochs`: BPR over mini-batches of training pairs, each
    against one uniformly drawn negative item, on the full graph's propagation. Seeded by epoch, so a
    resumed job draws what it would have drawn."""
    edge_index = bipartite_edge_index(data.num_users, data.train)
    users = torch.as_tensor(data.train[0])
    positives = torch.as_tensor(data.train[1]) + data.num_users

    def step(epoch: int) -> float:
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(users.numel(), generator=generator)
        negatives = torch.randint(0, data.num_items, (users.numel(),), generator=generator) + data.num_users
        model.train()
        losses = []
        for chunk in order.split(batch_size):
            u, p, n = users[chunk], positives[chunk], negatives[chunk]
            label_index = torch.stack([torch.cat([u, u]), torch.cat([p, n])])
            optimizer.zero_grad()
            rank = model(edge_index, label_index)
            pos_rank, neg_rank = rank.chunk(2)
            loss = model.recommendation_loss(pos_rank, neg_rank, node_id=torch.unique(label_index), lambda_reg=1e-4)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        model.eval()
        return float(np.mean(losses))

    return step


def train_lightgcn(
    data: Interactions,
    embedding_dim: int = 32,
    num_layers: int = 2,
    epochs: int = 60,
    lr: float = 0.02,
    seed: int = 0,
    batch_size: int | None = None,
) -> LightGCN:
    """BPR with Adam; full batch unless `batch_size` is given."""
    torch.manual_seed(seed)
    model = LightGCN(data.num_users + data.num_items, embedding_dim, num_layers)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    step = bpr_epoch(model, opt, data, batch_size or data.train.shape[1], seed)
    for epoch in range(epochs):
        step(epoch)
    return model.eval()


def score_items(model: LightGCN, num_users: int, edge_index: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
    """len(users) x I scores, propagated over `edge_index` (so an updated graph is used as is)."""
    with torch.no_grad():
        emb = model.get_embedding(edge_index)
    return emb[users] @ emb[num_users:].T


def top_k(scores: torch.Tensor, seen: list[set[int]] | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k items per row, with each row's `seen` items excluded when given."""
    scores = scores.clone()
    if seen is not None:
        for row, items in enumerate(seen):
            if items:
                scores[row, list(items)] = float("-inf")
    values, index = scores.topk(min(k, scores.shape[1]), dim=1)
    return index, values


def ranking_metrics(ranked: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """recall@k and NDCG@k with one held-out item per user (k = ranked.shape[1])."""
    hits = ranked == truth[:, None]
    recall = float(hits.any(axis=1).mean())
    pos = hits.argmax(axis=1)
    ndcg = float(np.where(hits.any(axis=1), 1.0 / np.log2(pos + 2), 0.0).mean())
    return recall, ndcg


def seen_sets(data: Interactions) -> list[set[int]]:
    seen: list[set[int]] = [set() for _ in range(data.num_users)]
    for u, i in data.train.T:
        seen[int(u)].add(int(i))
    return seen


def evaluate(model: LightGCN, data: Interactions, k: int = 10) -> dict[str, float]:
    """The model's and popularity's recall@k / NDCG@k on the held-out split, seen items excluded."""
    if not data.test.shape[1]:
        raise InvalidArgumentError("data: no user has two interactions, so nothing can be held out to evaluate on")
    edge_index = bipartite_edge_index(data.num_users, data.train)
    users = torch.as_tensor(data.test[0])
    seen = seen_sets(data)
    test_seen = [seen[int(u)] for u in users]
    ranked, _ = top_k(score_items(model, data.num_users, edge_index, users), test_seen, k)
    recall, ndcg = ranking_metrics(ranked.numpy(), data.test[1])
    counts = torch.as_tensor(np.bincount(data.train[1], minlength=data.num_items), dtype=torch.float32)
    pop_ranked, _ = top_k(counts.expand(len(users), -1), test_seen, k)
    pop_recall, pop_ndcg = ranking_metrics(pop_ranked.numpy(), data.test[1])
    return {
        f"recall@{k}": recall,
        f"ndcg@{k}": ndcg,
        f"popularity_recall@{k}": pop_recall,
        f"popularity_ndcg@{k}": pop_ndcg,
    }


# ---- Serving


@dataclass
class ServingTable:
    """One (version, graph version)'s propagated embeddings and what answers read with them."""

    graph: str
    graph_version: int
    num_nodes: int
    num_edges: int
    embedding: torch.Tensor  # [N, d]
    items: np.ndarray  # node ids of the items, ascending
    position: np.ndarray  # [N]: each node's index in `items`, -1 for users
    item_embedding: torch.Tensor  # [I, d]
    popularity: torch.Tensor  # [I]: interactions of each item
    content: torch.Tensor | None  # [I, D] L2-normalised content vectors, or None
    has_content: np.ndarray  # [I] bool
    indptr: np.ndarray
    indices: np.ndarray

    def neighbours(self, node: int) -> np.ndarray:
        return np.asarray(self.indices[self.indptr[node] : self.indptr[node + 1]], np.int64)

    def degree(self, nodes: np.ndarray) -> np.ndarray:
        return np.asarray(self.indptr[nodes + 1], np.int64) - np.asarray(self.indptr[nodes], np.int64)


@dataclass
class RecommendQuery:
    table: ServingTable
    users: np.ndarray  # node ids
    top_k: int
    include_seen: bool = False


@dataclass
class SimilarQuery:
    table: ServingTable
    items: np.ndarray  # node ids
    top_k: int
    by: str = "content"


@dataclass
class Recommender:
    """A recommender version: LightGCN's layer-0 embeddings of the nodes it was trained on."""

    weights: torch.Tensor  # [N0, d]
    num_layers: int
    in_channels: int
    device: str = "cpu"
    task: str = "recommend"
    graphs: dict = field(default_factory=dict)  # none stored with the model: its graph is in the graph store
    tables: OrderedDict = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _building: dict = field(default_factory=dict)  # a lock per graph version whose table is being built

    @classmethod
    def load(cls, config: dict, artifacts) -> Recommender:
        weights = load(artifacts.read(config["weights_file"]))["embedding"]
        return cls(weights, int(config["num_layers"]), int(config["in_channels"]))

    @property
    def trained_nodes(self) -> int:
        return self.weights.shape[0]

    def warm_up(self, max_batch_size: int = 1) -> None:
        pass  # the first answer on a graph version builds its table

    def table(self, stored) -> ServingTable:
        """The propagated table of a stored graph's version (built once, then kept). Blocking."""
        key = (stored.name, stored.version)
        with self._lock:
            table = self.tables.get(key)
            if table is not None:
                self.tables.move_to_end(key)
                return table
            building = self._building.setdefault(key, threading.Lock())
        # One build per graph version; answers on other versions go on meanwhile.
        with building:
            with self._lock:
                table = self.tables.get(key)
            if table is None:
                table = self._build(stored)
                with self._lock:
                    self.tables[key] = table
                    while len(self.tables) > TABLES_KEPT:
                        self.tables.popitem(last=False)
                    self._building.pop(key, None)
        return table

    def _build(self, stored) -> ServingTable:
        from services.gnn.sampling import csr_edge_index

        indptr, indices, features = stored.indptr, stored.indices, np.asarray(stored.node_features)
        n = stored.num_nodes
        weights = torch.zeros((n, self.weights.shape[1]), dtype=torch.float32)
        weights[: self.trained_nodes] = self.weights
        model = LightGCN(n, self.weights.shape[1], self.num_layers)
        with torch.no_grad():
            model.embedding.weight.copy_(weights)
            edge_index = torch.from_numpy(csr_edge_index(indptr, indices))
            embedding = model.get_embedding(edge_index)
        is_item = features[:, ITEM_COLUMN] > 0.5
        items = np.flatnonzero(is_item).astype(np.int64)
        position = np.full(n, -1, np.int64)
        position[items] = np.arange(len(items))
        degree = np.diff(np.asarray(indptr, np.int64))
        content = None
        has_content = np.zeros(len(items), bool)
        if features.shape[1] > 1:
            vectors = features[items, 1:]
            norms = np.linalg.norm(vectors, axis=1)
            has_content = norms > 0
            content = torch.from_numpy(np.divide(vectors, norms[:, None], out=np.zeros_like(vectors),
                                                 where=norms[:, None] > 0))  # fmt: skip
        return ServingTable(
            stored.name, stored.version, n, len(indices), embedding, items, position, embedding[items],
            torch.as_tensor(degree[items], dtype=torch.float32), content, has_content, np.asarray(indptr),
            np.asarray(indices),
        )  # fmt: skip

    def item_size(self, item) -> int:
        return len(item.users) if isinstance(item, RecommendQuery) else len(item.items)

    def run_batch(self, queries: list) -> list[dict[str, np.ndarray]]:
        """Queries on one table are scored together: one matrix product for all their users."""
        answers: list[dict[str, np.ndarray] | None] = [None] * len(queries)
        groups: dict[tuple[int, type], list[int]] = {}
        for i, query in enumerate(queries):
            groups.setdefault((id(query.table), type(query)), []).append(i)
        for (_, kind), members in groups.items():
            run = recommend_batch if kind is RecommendQuery else similar_batch
            for i, answer in zip(members, run([queries[i] for i in members]), strict=True):
                answers[i] = answer
        return answers  # type: ignore[return-value]


def recommend_batch(queries: list[RecommendQuery]) -> list[dict[str, np.ndarray]]:
    table = queries[0].table
    users = torch.from_numpy(np.concatenate([q.users for q in queries]))
    with torch.no_grad():
        scores = table.embedding[users] @ table.item_embedding.T
    answers, start = [], 0
    for query in queries:
        rows = scores[start : start + len(query.users)].clone()
        start += len(query.users)
        cold = table.degree(query.users) == 0
        if cold.any():  # no interactions: nothing to propagate from, so popularity
            rows[torch.from_numpy(cold)] = table.popularity
        if not query.include_seen:
            for row, user in enumerate(query.users):
                seen = table.position[table.neighbours(int(user))]
                rows[row, torch.from_numpy(seen[seen >= 0])] = float("-inf")
        answers.append({**_top(rows, table.items, query.top_k), "popularity_fallback": cold})
    return answers


def similar_batch(queries: list[SimilarQuery]) -> list[dict[str, np.ndarray]]:
    answers = []
    for query in queries:
        table = query.table
        at = torch.from_numpy(table.position[query.items])
        if query.by == "content":
            vectors = table.content
        else:
            vectors = torch.nn.functional.normalize(table.item_embedding, dim=1)
        with torch.no_grad():
            rows = vectors[at] @ vectors.T
        if query.by == "content":
            rows[:, torch.from_numpy(~table.has_content)] = float("-inf")
        rows[torch.arange(len(at)), at] = float("-inf")  # an item is not similar to itself
        answers.append(_top(rows, table.items, query.top_k))
    return answers


def _top(rows: torch.Tensor, items: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """The k best columns of each row as item node ids and scores; past the candidates left, -1 and 0."""
    values, index = rows.topk(min(k, rows.shape[1]), dim=1)
    ids = items[index.numpy()]
    scores = values.numpy().astype(np.float32)
    gone = ~np.isfinite(scores)
    ids[gone], scores[gone] = -1, 0.0
    if k > ids.shape[1]:
        pad = k - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, pad)))
    return {"items": ids.astype(np.int64), "scores": scores}
