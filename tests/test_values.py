"""``castiron.values.value`` behaves like ``dataclass(frozen=True)``."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from dataclasses import field

import pytest

from castiron.values import value


@value
class Row:
    """A row for the tests."""

    name: str
    size: int = 0
    tags: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.size < 0:
            raise ValueError("size must not be negative")


def test_construction_equality_repr_and_dataclass_helpers() -> None:
    row = Row("a", size=2)
    assert row == Row(name="a", size=2, tags={})
    assert row != Row("a")
    assert repr(row) == "Row(name='a', size=2, tags={})"
    assert dataclasses.is_dataclass(row)
    assert dataclasses.replace(row, size=3) == Row("a", 3)
    assert dataclasses.asdict(row) == {"name": "a", "size": 2, "tags": {}}
    assert Row.__match_args__ == ("name", "size", "tags")
    assert copy.deepcopy(row) == row
    assert pickle.loads(pickle.dumps(row)) == row
    assert Row("a").tags is not Row("a").tags


def test_frozen_and_hash() -> None:
    row = Row("a")
    with pytest.raises(dataclasses.FrozenInstanceError):
        row.name = "b"  # type: ignore[misc]
    with pytest.raises(TypeError):
        hash(row)  # a dict field is unhashable, as with dataclass

    @value
    class Point:
        """Hashable."""

        x: int
        y: int

    assert hash(Point(1, 2)) == hash(Point(1, 2))
    assert len({Point(1, 2), Point(1, 2)}) == 1


@pytest.mark.parametrize(
    ("args", "kwargs", "error"),
    [
        ((), {}, TypeError),
        (("a", 1, {}, 4), {}, TypeError),
        (("a",), {"name": "b"}, TypeError),
        (("a",), {"colour": "red"}, TypeError),
        (("a", -1), {}, ValueError),
    ],
)
def test_bad_construction(args: tuple[object, ...], kwargs: dict[str, object], error: type) -> None:
    with pytest.raises(error):
        Row(*args, **kwargs)  # type: ignore[arg-type]
