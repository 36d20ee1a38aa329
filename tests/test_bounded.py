"""Forgetting from the front of insertion-ordered dicts (rules/bounded.py): the same result
as a list of the entries in order would give."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from rules.bounded import forget_while, trim


def test_forget_while_stops_at_the_first_entry_to_keep() -> None:
    ordered = {"a": 1, "b": 2, "c": 9, "d": 3}
    forget_while(ordered, lambda v: v < 5)
    assert list(ordered.items()) == [("c", 9), ("d", 3)]  # d is behind c: kept for now
    forget_while(ordered, lambda v: v < 100)
    assert ordered == {}
    forget_while(ordered, lambda v: True)  # nothing to forget
    assert ordered == {}


def test_trim_keeps_the_cap_exactly_below_a_thousand_and_forgets_a_little_more_above() -> None:
    small = {i: i for i in range(1000)}
    trim(small, 999)
    assert list(small) == list(range(1, 1000))
    large = {i: i for i in range(5001)}
    trim(large, 5000)  # one over: it, and 5000 // 1024 more
    assert list(large) == list(range(5, 5001))
    trim(large, 5000)  # under the cap: nothing
    assert len(large) == 4996


operations = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 50), st.integers(0, 100)),
        st.tuples(st.just("forget_below"), st.integers(0, 100)),
        st.tuples(st.just("trim"), st.integers(0, 40)),
    ),
    max_size=300,
)


@given(operations)
def test_the_dict_holds_what_a_list_in_order_would(ops: list[tuple[object, ...]]) -> None:
    ordered: dict[int, int] = {}
    model: list[tuple[int, int]] = []  # (key, value), oldest first
    for op in ops:
        if op[0] == "put":
            _, key, value = op
            assert isinstance(key, int) and isinstance(value, int)
            if key in ordered:  # a new value where it was, as a dict does
                model = [(k, value if k == key else v) for k, v in model]
            else:
                model.append((key, value))
            ordered[key] = value
        elif op[0] == "forget_below":
            below = op[1]
            assert isinstance(below, int)
            forget_while(ordered, lambda v, below=below: v < below)
            while model and model[0][1] < below:
                model.pop(0)
        else:
            cap = op[1]
            assert isinstance(cap, int)
            trim(ordered, cap)
            if len(model) > cap:
                model = model[len(model) - cap + cap // 1024 :]
        assert list(ordered.items()) == model
