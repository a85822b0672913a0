"""The port-list cache of the translator keeps validation exact."""

from __future__ import annotations

import pytest
from fakes.kube_helpers import service

from node_services.sources.errors import TranslateError
from node_services.sources.kube.translate import translate
from node_services.state.records import Service


def test_equal_port_lists_share_one_tuple() -> None:
    first = translate(service("a", "10.43.0.1"), "t")[0]
    second = translate(service("b", "10.43.0.2"), "t")[0]
    assert isinstance(first, Service) and isinstance(second, Service)
    assert first.ports is second.ports
    assert first.ports[0].port == 80 and first.ports[0].target_port == "8080"


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("port", True, "spec.ports[0].port: expected an integer, got True"),
        ("port", 70000, "spec.ports[0].port: 70000 is out of range"),
        ("protocol", "HTTP", "spec.ports[0].protocol: 'HTTP' is not TCP, UDP or SCTP"),
    ],
)
def test_a_bad_port_is_rejected_even_after_an_equal_looking_valid_one(
    field: str, value: object, reason: str
) -> None:
    good = service("good", "10.43.0.3")
    good["spec"]["ports"][0]["port"] = 1
    translate(good, "t")  # cached: port 1
    bad = service("bad", "10.43.0.4")
    bad["spec"]["ports"][0][field] = value
    with pytest.raises(TranslateError) as info:
        translate(bad, "t")
    assert str(info.value) == f"Service default/bad: {reason}"


def test_float_target_port_is_not_confused_with_an_int() -> None:
    as_int = service("i", "10.43.0.5")
    as_float = service("f", "10.43.0.6")
    as_float["spec"]["ports"][0]["targetPort"] = 8080.0
    assert translate(as_int, "t")[0].ports[0].target_port == "8080"  # type: ignore[union-attr]
    assert translate(as_float, "t")[0].ports[0].target_port == "8080.0"  # type: ignore[union-attr]
