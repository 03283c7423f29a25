"""Collaborative filtering on a bipartite user-item graph: a planted-community data set, a
LightGCN trained with BPR loss, recall@k / NDCG@k on a seeded leave-last-out split, and a
popularity baseline measured on the same split.

Users and items share one node index space for LightGCN: users are 0..U-1, items U..U+I-1.
Everything here is generated and trained offline, on CPU, in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch_geometric.nn import LightGCN


@dataclass
class Interactions:
    num_users: int
    num_items: int
    train: np.ndarray  # 2 x E_train (user, item)
    test: np.ndarray  # 2 x U_test (user, item): each user's last interaction, held out


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
    held out (leave-last-out), seeded.
    """
    rng = np.random.default_rng(seed)
    user_comm = rng.integers(0, num_communities, num_users)
    item_comm = np.arange(num_items) % num_communities
    popularity = 1.0 / np.arange(1, num_items + 1) ** 0.5
    popularity = popularity[rng.permutation(num_items)]
    pairs_u, pairs_i = [], []
    test_u, test_i = [], []
    for u in range(num_users):
        own = np.flatnonzero(item_comm == user_comm[u])
        p_own = popularity[own] / popularity[own].sum()
        p_all = popularity / popularity.sum()
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
    return Interactions(
        num_users,
        num_items,
        np.array([pairs_u, pairs_i], np.int64),
        np.array([test_u, test_i], np.int64),
    )


def bipartite_edge_index(num_users: int, pairs: np.ndarray) -> torch.Tensor:
    """Both directions of every (user, item) pair, items offset by num_users."""
    u = torch.as_tensor(pairs[0])
    i = torch.as_tensor(pairs[1]) + num_users
    return torch.stack([torch.cat([u, i]), torch.cat([i, u])])


def train_lightgcn(
    data: Interactions,
    embedding_dim: int = 32,
    num_layers: int = 2,
    epochs: int = 60,
    lr: float = 0.02,
    seed: int = 0,
) -> LightGCN:
    """Full-batch BPR: every training pair against one uniformly drawn negative item per epoch."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    n = data.num_users + data.num_items
    model = LightGCN(n, embedding_dim, num_layers)
    edge_index = bipartite_edge_index(data.num_users, data.train)
    users = torch.as_tensor(data.train[0])
    pos = torch.as_tensor(data.train[1]) + data.num_users
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        neg = torch.randint(0, data.num_items, (users.numel(),), generator=gen) + data.num_users
        label_index = torch.stack([torch.cat([users, users]), torch.cat([pos, neg])])
        opt.zero_grad()
        rank = model(edge_index, label_index)
        pos_rank, neg_rank = rank.chunk(2)
        loss = model.recommendation_loss(pos_rank, neg_rank, node_id=torch.unique(label_index), lambda_reg=1e-4)
        loss.backward()
        opt.step()
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
