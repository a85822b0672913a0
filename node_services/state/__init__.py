"""The shared state cache: records, the store and its immutable snapshots. Pure data, no I/O."""

from node_services.state.frozenmap import FrozenMap
from node_services.state.records import (
    Change,
    Deleted,
    Endpoint,
    Endpoints,
    Host,
    Port,
    Record,
    Service,
    ServiceLink,
    Stack,
    Workload,
)
from node_services.state.store import ChangeSet, Snapshot, Store, Subscription

__all__ = [
    "Change",
    "ChangeSet",
    "Deleted",
    "Endpoint",
    "Endpoints",
    "FrozenMap",
    "Host",
    "Port",
    "Record",
    "Service",
    "ServiceLink",
    "Snapshot",
    "Stack",
    "Store",
    "Subscription",
    "Workload",
]
