"""node-services: per-node DNS, metadata and IPAM/overlay services from one shared state cache."""

__version__ = "0.1.0"
