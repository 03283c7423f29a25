# syntax=docker/dockerfile:1
# maas: the gnn model service (torch-geometric).
# GPU image (default), on a CUDA 13 + cuDNN 9 runtime as onnxruntime-gpu 1.31 needs:
#   docker build -f deploy/docker/gnn.Dockerfile -t maas-gnn:0.1.0-gpu .
# CPU variant:
#   docker build -f deploy/docker/gnn.Dockerfile --build-arg BASE_IMAGE=python:3.11.14-slim-bookworm \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t maas-gnn:0.1.0-cpu .
ARG BASE_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

# Build stage: a standalone Python 3.11 and a venv with the pinned dependencies, plus the generated stubs.
FROM ${BASE_IMAGE} AS build
ARG TORCH_INDEX_URL=https://pypi.org/simple
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy VIRTUAL_ENV=/opt/venv
RUN uv python install 3.11.14 && uv venv --python 3.11.14 /opt/venv
WORKDIR /src
COPY requirements.lock deploy/docker/requirements/gnn.in ./
RUN uv pip install --no-cache --index-strategy unsafe-best-match --extra-index-url "${TORCH_INDEX_URL}" \
    -r gnn.in -c requirements.lock grpcio-tools==1.85.1
COPY protos/ protos/
RUN mkdir -p gen && /opt/venv/bin/python -m grpc_tools.protoc -I protos --python_out=gen --pyi_out=gen \
    --grpc_python_out=gen protos/maas/common/v1/*.proto protos/maas/dense/v1/*.proto \
    protos/maas/gnn/v1/*.proto protos/maas/nlp/v1/*.proto protos/maas/training/v1/*.proto protos/inference/*.proto \
    && find gen -mindepth 1 -type d -exec touch {}/__init__.py \;

# Runtime stage: no build tools, a non-root user, a read-only-friendly layout.
FROM ${BASE_IMAGE}
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv
COPY --from=build /src/gen /app/gen
COPY shared/ /app/shared/
COPY services/__init__.py /app/services/
COPY services/gnn/ /app/services/gnn/
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH PYTHONPATH=/app:/app/gen PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 MAAS_DENSE_HOST=0.0.0.0 MAAS_GNN_HOST=0.0.0.0 MAAS_NLP_HOST=0.0.0.0
# Mount points owned by the runtime user, so fresh volumes are writable by it.
RUN mkdir -p /models /datasets /checkpoints && chown 10001:10001 /models /datasets /checkpoints
USER 10001:10001
EXPOSE 50062
ENTRYPOINT ["python", "-m", "services.gnn"]
