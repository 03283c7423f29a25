# syntax=docker/dockerfile:1
# maas: the gateway, the cluster's one public endpoint. It needs no GPU, so one CPU image serves every cluster.
#   docker build -f deploy/docker/gateway.Dockerfile -t maas-gateway:0.1.0 .
FROM python:3.11.14-slim-bookworm AS build
COPY --from=ghcr.io/astral-sh/uv:0.13.9 /uv /usr/local/bin/uv
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy VIRTUAL_ENV=/opt/venv
RUN uv venv --python /usr/local/bin/python3.11 /opt/venv
WORKDIR /src
COPY requirements.lock deploy/docker/requirements/gateway.in ./
RUN uv pip install --no-cache -r gateway.in -c requirements.lock grpcio-tools==1.85.1
COPY protos/ protos/
RUN mkdir -p gen && /opt/venv/bin/python -m grpc_tools.protoc -I protos --python_out=gen --pyi_out=gen \
    --grpc_python_out=gen protos/maas/common/v1/*.proto protos/maas/dense/v1/*.proto \
    protos/maas/gnn/v1/*.proto protos/maas/nlp/v1/*.proto protos/maas/training/v1/*.proto protos/inference/*.proto \
    && find gen -mindepth 1 -type d -exec touch {}/__init__.py \;

FROM python:3.11.14-slim-bookworm
COPY --from=build /opt/venv /opt/venv
COPY --from=build /src/gen /app/gen
COPY shared/ /app/shared/
COPY gateway/ /app/gateway/
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH PYTHONPATH=/app:/app/gen PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    MAAS_GATEWAY_HOST=0.0.0.0
RUN mkdir -p /datasets && chown 10001:10001 /datasets
USER 10001:10001
EXPOSE 50051 8080 9464
ENTRYPOINT ["python", "-m", "gateway"]
