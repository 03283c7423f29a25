"""Settings of the gnn service, read from MAAS_GNN_* variables in `main()`."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.gnn.graph_store import GraphLimits, GraphVersioning
from services.gnn.plaintext_cache import DEFAULT_PARENT, PlaintextCache
from services.gnn.runtime import QueryLimits
from shared.settings import ModelServiceSettings


class GnnSettings(ModelServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MAAS_GNN_", extra="ignore")

    port: int = Field(50062, description="gRPC port of the gnn service (every worker binds it).")
    max_batch_size: int = Field(4096, description="Most nodes, over all merged graphs, in one batch.")
    max_hops: int = Field(4, description="Most hops (k) a stored-graph query may sample.")
    max_fan_out: int = Field(1000, description="Most neighbours per node per hop a query may ask for (-1: all).")
    max_subgraph_nodes: int = Field(200_000, description="Most nodes a sampled neighbourhood may hold.")
    max_full_graph_nodes: int = Field(
        200_000, description="Largest stored graph a query may run whole (node_ids empty, or top_k links)."
    )
    max_graph_nodes: int = Field(100_000, description="Most nodes of one graph sent inline.")
    max_graph_edges: int = Field(2_000_000, description="Most edges of one graph sent inline.")
    max_graphs_per_call: int = Field(1024, description="Most graphs one ClassifyGraphs call may carry.")
    max_top_k: int = Field(100, description="Most new neighbours PredictLinks, or items Recommend and SimilarItems, "
                                            "return per node.")
    max_users_per_call: int = Field(1024, ge=1, description="Most users (or items) one Recommend (or SimilarItems) "
                                                            "call may name.")
    onnx_graph_classifiers: bool = Field(
        False,
        description="Serve graph classifiers whose ONNX export held up (ONNX Runtime matched torch within 1e-5) "
        "on ONNX Runtime, with the onnx_* settings. About 8x less compute per single small graph than torch, "
        "but ORT's CPU scatter makes a 64-graph batch about 3x slower than torch's (make bench), so off by "
        "default, as for node and link models.",
    )
    max_stored_graph_nodes: int = Field(50_000_000, description="Most nodes an update may grow a stored graph to.")
    max_update_nodes: int = Field(100_000, description="Most nodes one UpdateGraph call may add.")
    max_update_edges: int = Field(1_000_000, description="Most edges one UpdateGraph call may add.")
    keep_graph_versions: int = Field(
        10, description="Versions of each stored graph kept (the latest; with the delta bases they need); 0: all."
    )
    max_graph_delta_chain: int = Field(8, description="Updates stored as deltas on one full version before a full one.")
    graph_compact_fraction: float = Field(
        0.1, description="An update is stored whole once the deltas would hold this fraction of the full version."
    )
    graph_plaintext_dir: str = Field(
        "",
        description="Memory-only directory (tmpfs) in which sealed graphs are decrypted once (into maas-graphs-<uid>) "
        "for every replica of this user on the machine; empty: /dev/shm; 'none': decrypt into each process.",
    )

    def query_limits(self) -> QueryLimits:
        return QueryLimits(
            self.max_hops, self.max_fan_out, self.max_subgraph_nodes, self.max_full_graph_nodes,
            self.max_graph_nodes, self.max_graph_edges, self.max_graphs_per_call, self.max_top_k,
            self.max_users_per_call,
        )  # fmt: skip

    def graph_limits(self) -> GraphLimits:
        return GraphLimits(self.max_stored_graph_nodes, self.max_update_nodes, self.max_update_edges)

    def graph_versioning(self) -> GraphVersioning:
        return GraphVersioning(self.keep_graph_versions, self.max_graph_delta_chain, self.graph_compact_fraction)

    def graph_plaintext(self) -> PlaintextCache | None:
        if self.graph_plaintext_dir == "none":
            return None
        return PlaintextCache.at(self.graph_plaintext_dir or DEFAULT_PARENT)


class GnnContentSettings(BaseSettings):
    """How the gnn trainer gives items content vectors: a recommender's data set whose items come with texts
    (item_texts) gets their embeddings from the nlp service, at training time. Read from MAAS_GNN_TRAINER_*."""

    model_config = SettingsConfigDict(env_prefix="MAAS_GNN_TRAINER_", extra="ignore")

    nlp_target: str = Field("127.0.0.1:50063", description="The nlp service the gnn trainer embeds item texts with "
                                                           "(make run and the manifests set it).")
    content_model: str = Field("minilm-l6-v2", description="The nlp embedding model that embeds item texts.")
    content_timeout_s: float = Field(120.0, gt=0, description="Deadline of each call that embeds item texts.")
