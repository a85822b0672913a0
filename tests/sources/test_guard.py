"""The sources' guard: any exception of a load or translate step is a rejection, never a crash."""

from __future__ import annotations

import asyncio
import json

import pytest
from prometheus_client import CollectorRegistry

from node_services.sources.errors import InputLimitError, TranslateError
from node_services.sources.guard import REASON_MAX, Rejected, Rejections, guarded


def deep_json() -> object:
    return json.loads("[" * 100_000 + "]" * 100_000)


def out_of_memory() -> object:
    raise MemoryError


@pytest.mark.parametrize(
    ("step", "reason", "kind"),
    [
        (deep_json, "nested too deeply to process (RecursionError)", "limit"),
        (out_of_memory, "ran out of memory while processing it (MemoryError)", "error"),
        (lambda: int(float("nan")), "ValueError: cannot convert float NaN to integer", "error"),
        (
            lambda: int(float("inf")),
            "OverflowError: cannot convert float infinity to integer",
            "error",
        ),
        (lambda: {}["x"], "KeyError: 'x'", "error"),
        (
            lambda: (_ for _ in ()).throw(TranslateError("Node a", "spec: bad")),
            "spec: bad",
            "invalid",
        ),
        (
            lambda: (_ for _ in ()).throw(InputLimitError("too deep")),
            "too deep",
            "limit",
        ),
    ],
)
def test_any_exception_is_a_rejection_naming_what_failed(
    step: object, reason: str, kind: str
) -> None:
    outcome = guarded(step, what="snap.yaml")  # type: ignore[arg-type]
    assert outcome == Rejected("snap.yaml", reason, kind)
    assert str(outcome) == f"snap.yaml: {reason}"


def test_a_step_that_succeeds_gives_its_value() -> None:
    assert guarded(lambda: [1, 2], what="x") == [1, 2]


@pytest.mark.parametrize("exc", [asyncio.CancelledError, KeyboardInterrupt, SystemExit])
def test_cancellation_and_exit_pass_through(exc: type[BaseException]) -> None:
    def step() -> None:
        raise exc

    with pytest.raises(exc):
        guarded(step, what="x")


def test_a_long_reason_is_cut_to_one_bounded_line() -> None:
    def step() -> None:
        raise ValueError("bad\n" + "x" * 10_000)

    outcome = guarded(step, what="x")
    assert isinstance(outcome, Rejected)
    assert len(outcome.reason) == REASON_MAX
    assert outcome.reason.startswith("ValueError: bad xxx") and outcome.reason.endswith("...")


def test_rejections_are_counted_on_the_registry_and_optional() -> None:
    registry = CollectorRegistry()
    rejections = Rejections(registry)
    rejections.rejected_load("static:/a", "limit")
    rejections.rejected_load("static:/a", "limit")
    rejections.rejected_object("kubernetes:nodes")
    loads = registry.get_sample_value(
        "node_services_source_rejected_loads_total", {"source": "static:/a", "reason": "limit"}
    )
    objects = registry.get_sample_value(
        "node_services_source_rejected_objects_total", {"source": "kubernetes:nodes"}
    )
    assert (loads, objects) == (2, 1)
    Rejections().rejected_load("x", "error")  # no registry: counts nothing, fails nothing
