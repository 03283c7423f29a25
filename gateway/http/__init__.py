"""The gateway's HTTP front: KServe v2 REST, OpenAI-compatible embeddings, a web console and OpenAPI.

It runs in every gateway worker, on the worker's own event loop, beside the gRPC server, and calls
the gateway's own objects (proxy, catalog, model service, training servicer): no extra hop, the same
cache, auth, tenancy, roles, rate limits and deadlines as gRPC.
"""
