# The node-services image deploy/daemonset.yaml runs: docker build -t node-services:0.1.0 .
# Debian's Python 3.11 image; iproute2 for the DaemonSet's metadata-address init container.
FROM python:3.11-slim-bookworm
RUN apt-get update \
    && apt-get install -y --no-install-recommends iproute2 \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md /src/
COPY node_services /src/node_services
RUN pip install --no-cache-dir /src && rm -rf /src
ENTRYPOINT ["node-services"]
CMD ["run"]
