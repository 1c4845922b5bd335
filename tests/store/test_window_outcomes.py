"""The sort-index window's plan cache: a query shape whose window held no page skips it for a while, then
tries it again; shapes are the filter without its values."""

from __future__ import annotations

from callplane_server.store.query import CALLS
from callplane_server.store.query.pagination import _query_shape, _WindowOutcomes, resolve_sort


def test_a_shape_whose_window_came_up_short_skips_it_then_tries_again() -> None:
    outcomes = _WindowOutcomes()
    assert outcomes.worth_trying("selective")
    outcomes.record("selective", found=False)
    skipped = 0
    while not outcomes.worth_trying("selective"):
        skipped += 1
    assert skipped == _WindowOutcomes.RETRY_AFTER
    # Another shape is not affected, and a window that holds its page keeps being tried.
    outcomes.record("broad", found=True)
    assert outcomes.worth_trying("broad") and outcomes.worth_trying("broad")


def test_shapes_ignore_values_but_not_fields_operators_or_sort() -> None:
    by_created = resolve_sort(CALLS, ())

    def shape(conditions: dict) -> str:
        return _query_shape(CALLS, "", conditions, by_created)

    assert shape({"custom.region": "eu"}) == shape({"custom.region": "us"})
    assert shape({"custom.owner": {"$in": ["a", "b"]}}) == shape({"custom.owner": {"$in": ["c"]}})
    assert shape({"custom.region": "eu"}) != shape({"custom.owner": "eu"})
    assert shape({"custom.priority": {"$gte": 5}}) != shape({"custom.priority": {"$lte": 5}})
    assert shape({"$or": [{"custom.a": 1}, {"custom.b": 2}]}) == shape(
        {"$or": [{"custom.a": 3}, {"custom.b": 4}]}
    )
