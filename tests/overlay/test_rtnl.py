"""The rtnetlink codec: messages built here parse back to the same route and neighbour."""

from __future__ import annotations

import socket

from node_services.overlay import rtnl


def _payload(message: bytes) -> memoryview:
    [(kind, _flags, seq, payload)] = list(rtnl.messages(message))
    assert (kind, seq) == (rtnl.RTM_NEWROUTE, 7) or kind == rtnl.RTM_NEWNEIGH
    return payload


def test_route_message_round_trips_with_protocol_table_and_onlink() -> None:
    message = rtnl.route(
        rtnl.RTM_NEWROUTE,
        rtnl.NLM_F_REQUEST,
        7,
        dst="10.244.2.0/24",
        gateway="10.244.2.0",
        oif=5,
        onlink=True,
        protocol=77,
        table=254,
    )
    parsed = rtnl.parse_route(_payload(message))
    assert parsed == rtnl.RouteMsg(socket.AF_INET, "10.244.2.0", 24, "10.244.2.0", 5, True, 77, 254)
    assert rtnl.parse_route(_payload(message), protocol=4) is None


def test_neighbour_and_fdb_messages_round_trip() -> None:
    neigh = rtnl.neighbour(
        rtnl.RTM_NEWNEIGH, 0, 1, ifindex=3, ip="fd00:2::", mac="0a:00:00:00:00:02"
    )
    assert rtnl.parse_neighbour(_payload(neigh)) == rtnl.NeighMsg(
        socket.AF_INET6, 3, "fd00:2::", "0a:00:00:00:00:02", rtnl.NUD_PERMANENT, 0
    )
    fdb = rtnl.fdb(rtnl.RTM_NEWNEIGH, 0, 2, ifindex=3, mac="0a:00:00:00:00:02", dst="192.168.7.2")
    assert rtnl.parse_neighbour(_payload(fdb)) == rtnl.NeighMsg(
        rtnl.AF_BRIDGE, 3, "192.168.7.2", "0a:00:00:00:00:02", rtnl.NUD_PERMANENT, rtnl.NTF_SELF
    )
