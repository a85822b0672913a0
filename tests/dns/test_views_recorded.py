"""Per-client answers against rancher-dns v0.15.3's recorded answers (second scenario).

The daemon loads the recording's Cattle resources as a snapshot, runs as worker-a (the host the
recording's rancher-dns ran on) and forwards to a fake upstream with the recording's table. Each
recorded (caller, name, type) is asked again from the caller's own source address, and the rcode
and the answer set (owners lowercased, TTLs and order aside) must equal the recorded ones,
except for the reference's documented quirks (README of the recording, "Reference quirks"),
where we answer correctly; each exception is named and counted, so a new difference fails.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
from fakes.dns_table_upstream import TableUpstream
from helpers import FIXTURES, DaemonProcess, free_port

RECORDING = FIXTURES / "cattle" / "recorded-2"
Answer = frozenset[tuple[str, str, str]]


def recorded() -> list[dict[str, Any]]:
    with gzip.open(RECORDING / "dns-answers.jsonl.gz", "rt") as lines:
        return [json.loads(line) for line in lines]


def source_of(caller: str) -> str:
    return "127.0.0.1" if caller == "host" else caller


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    tmp = tmp_path_factory.mktemp("views")
    upstream = TableUpstream("127.0.0.2").start()
    process = DaemonProcess(
        [
            "--snapshot",
            str(RECORDING / "cattle-resources.json"),
            "--node-name",
            "worker-a",
            "--upstream",
            f"127.0.0.2:{upstream.port}",
            # rancher-metadata.rancher.internal is the metadata listen address; rancher-dns
            # answered 169.254.169.250, which is ours for a wildcard (only bound, never asked).
            "--metadata-listen",
            f"0.0.0.0:{free_port()}",
        ],
        tmp / "daemon.log",
    ).start()
    try:
        process.wait_for(lambda: process.get("/readyz")[0] == 200, what="readyz")
        yield process
    finally:
        process.stop()
        upstream.stop()


def ask(port: int, caller: str, qname: str, qtype: str) -> dns.message.Message:
    query = dns.message.make_query(qname, qtype)
    for attempt in range(3):
        try:
            return dns.query.udp(query, "127.0.0.1", port=port, source=source_of(caller), timeout=3)
        except dns.exception.Timeout:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def answer_set(records: list[list[Any]]) -> Answer:
    return frozenset(
        (owner.lower(), rtype, str(rdata).lower()) for owner, _, rtype, rdata in records
    )


def ours(response: dns.message.Message) -> tuple[str, Answer, bool]:
    records = [
        [rrset.name.to_text(), rrset.ttl, dns.rdatatype.to_text(rrset.rdtype), rdata.to_text()]
        for rrset in response.answer
        for rdata in rrset
    ]
    return (
        dns.rcode.to_text(response.rcode()),
        answer_set(records),
        bool(response.flags & dns.flags.AA),
    )


def difference(
    case: dict[str, Any], rcode: str, got: Answer, aa: bool, recorded_a: dict[str, Any]
) -> str | None:
    """The documented reason our answer may differ from the recorded one, or None;
    ``recorded_a`` is the recorded A answer of the same caller and name."""
    want = answer_set(case["answer"])
    exists = recorded_a["rcode"] == "NOERROR" and bool(recorded_a["answer"])
    if (rcode, got) == (case["rcode"], want):
        return "same"
    qname, qtype = case["qname"].lower(), case["qtype"]
    if qname == "rancher.internal." and rcode == "NOERROR" and not got and aa:
        return "quirk 9: the apex is ours (NODATA), not forwarded"
    if (
        case["rcode"] == "NXDOMAIN"
        and rcode == "NOERROR"
        and aa
        and (qname, "CNAME") in {(owner, rtype) for owner, rtype, _ in got}
    ):
        return "quirk 5: the CNAME of a CNAME-only name, for any type"
    if (
        case["rcode"] == "NXDOMAIN"
        and rcode == "NOERROR"
        and not got
        and aa
        and (exists or case["group"] == "stack")
    ):
        # Quirk 5: rancher-dns says NXDOMAIN for a name that exists with other types (or is a
        # stack, an empty non-terminal); a name it completes only for A/AAAA it forwards.
        return "quirk 5: NODATA for an existing name"
    if (
        qtype == "AAAA"
        and case["rcode"] == rcode == "NOERROR"
        and not want
        and got
        and all(rtype == "CNAME" for _, rtype, _ in got)
    ):
        return "quirk 6: AAAA keeps the CNAME"
    if (
        qtype == "AAAA"
        and case["rcode"] == "NOERROR"
        and rcode == "NXDOMAIN"
        and not want
        and recorded_a["rcode"] == "NXDOMAIN"
    ):
        return "quirk 8: upstream NXDOMAIN is passed on"
    if (
        qname.endswith(".in-addr.arpa.")
        and rcode == "NOERROR"
        and aa
        and all(rtype == "PTR" for _, rtype, _ in got)
        and (bool(got) == (qtype == "PTR"))
        and case["rcode"] == "NXDOMAIN"
    ):
        # rancher-dns has no PTR data (forwards reverse names); we answer the PTR of running
        # containers and VIPs, and NODATA for the other types of those names.
        return "extension: PTR records for running containers and VIPs"
    return None


def test_recorded_rancher_dns_answers_per_caller(daemon: DaemonProcess) -> None:
    cases = recorded()
    assert len(cases) == 5022
    by_question = {(c["caller"], c["qname"], c["qtype"]): c for c in cases}
    reasons: Counter[str] = Counter()
    unexplained = []
    for case in cases:
        rcode, got, aa = ours(ask(daemon.dns_port, case["caller"], case["qname"], case["qtype"]))
        recorded_a = by_question[(case["caller"], case["qname"], "A")]
        reason = difference(case, rcode, got, aa, recorded_a)
        if reason is None:
            unexplained.append(
                f"{case['caller']} {case['qname']} {case['qtype']} [{case['group']}]: "
                f"recorded {case['rcode']} {sorted(answer_set(case['answer']))}, "
                f"got {rcode} {sorted(got)}"
            )
        else:
            reasons[reason] += 1
    assert not unexplained, f"{len(unexplained)} differences:\n" + "\n".join(unexplained[:60])
    # Every container of worker-a has a view (the stopped Prometheus-1 too); none of worker-b.
    assert daemon.metric("node_services_dns_client_views") == "10.0"
    assert float(daemon.metric('node_services_dns_client_answers_total{kind="alias"}')) > 0
    assert float(daemon.metric('node_services_dns_client_answers_total{kind="completion"}')) > 0
    assert reasons == {
        "same": 2884,
        "quirk 5: NODATA for an existing name": 1826,
        "quirk 5: the CNAME of a CNAME-only name, for any type": 75,
        "quirk 6: AAAA keeps the CNAME": 25,
        "quirk 8: upstream NXDOMAIN is passed on": 122,
        "quirk 9: the apex is ours (NODATA), not forwarded": 45,
        "extension: PTR records for running containers and VIPs": 45,
    }
