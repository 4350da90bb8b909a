"""The symbolic pickle VM follows CPython's unpickler, and stays bounded."""

from __future__ import annotations

import pickle
from collections import OrderedDict
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelkit.errors import UnsafeFileError
from modelkit.formats.pickle_vm import Limits, PickleError, PickleVM, parse_int_line
from modelkit.formats.unpickler import collect, make_policy, refuse


def _run(data: bytes, limits: Limits | None = None) -> Any:
    return PickleVM(data, make_policy(refuse("x"), None), limits=limits).run()


leaves = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**200), max_value=2**200),
    st.floats(allow_nan=False), st.text(max_size=20), st.binary(max_size=20),
)
values = st.recursive(
    leaves,
    lambda kids: st.one_of(
        st.lists(kids, max_size=5), st.tuples(kids, kids),
        st.dictionaries(st.one_of(st.text(max_size=5), st.integers()), kids, max_size=5),
        st.frozensets(st.integers(), max_size=4), st.sets(st.text(max_size=3), max_size=4),
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(value=values, proto=st.integers(min_value=0, max_value=5))
def test_vm_agrees_with_cpython_on_plain_data(value: Any, proto: int) -> None:
    data = pickle.dumps(value, protocol=proto)
    assert _run(data) == pickle.loads(data)


def test_ordered_dict_and_shared_references() -> None:
    shared = [1, 2]
    od = OrderedDict(a=shared, b=shared)
    out = _run(pickle.dumps(od, protocol=2))
    assert out == od and out["a"] is out["b"]


@pytest.mark.parametrize("line,expected", [
    ("00", False), ("01", True), ("10", 10), ("-7", -7), ("0x1f", 31), ("010", 8), (" 5", 5),
    ("99999999999999999999", 99999999999999999999),
    # strtol stops early, so CPython re-reads the line with PyLong_FromString(s, NULL, 0)
    ("1_000", 1000), ("7 ", 7), ("0o17", 15), ("0b11", 3), ("\t5\t", 5),
    ("1\x00junk", 1),  # C strings end at NUL
    (" 1", True),  # three bytes with the newline, value 1: a bool
])
def test_int_opcode_parsed_like_the_c_unpickler(line: str, expected: Any) -> None:
    assert parse_int_line(line) == expected
    assert _run(b"I" + line.encode() + b"\n.") == expected


@pytest.mark.parametrize("line", ["abc", "", "0x", "12a", "1__0"])
def test_int_opcode_rejects_what_cpython_rejects(line: str) -> None:
    with pytest.raises(PickleError):
        _run(b"I" + line.encode() + b"\n.")


def test_bounds() -> None:
    # billion laughs through the memo: a list appended to itself by reference, many times
    laughs = b"\x80\x02]q\x00" + b"h\x00h\x00\x86" * 10 + b"."
    assert isinstance(_run(laughs), tuple)  # cheap: shared references, no copies
    with pytest.raises(PickleError) as info:
        _run(b"(" * 200_000 + b".", Limits(max_marks=100_000))
    assert info.value.kind == "limit"
    with pytest.raises(PickleError) as info:
        _run(b"\x8b" + (10**9).to_bytes(4, "little") + b".")
    assert info.value.kind == "truncated"  # a size claim is checked against the data, nothing allocated
    big = _run(b"\x8b" + (70_000).to_bytes(4, "little") + b"\x01" * 70_000 + b".")
    assert "70000-byte integer" in repr(big)  # kept symbolic, never rendered
    with pytest.raises(PickleError) as info:
        _run(b"N" * 1000 + b".", Limits(max_ops=500))
    assert info.value.kind == "limit"
    with pytest.raises(PickleError) as info:
        _run(b"\x80\x02" + b"]\x94" * 100 + b".", Limits(max_memo=50))
    assert info.value.kind == "limit"


def test_errors_are_precise() -> None:
    with pytest.raises(PickleError, match="truncated"):
        _run(b"\x80\x02X\xff\x00\x00\x00abc")
    with pytest.raises(PickleError, match="unknown pickle opcode"):
        _run(b"\x80\x02\xff.")
    with pytest.raises(PickleError, match="underflow"):
        _run(b"\x80\x02.")
    with pytest.raises(PickleError, match="memo key"):
        _run(b"\x80\x02h\x05.")
    with pytest.raises(PickleError, match="MARK"):
        _run(b"\x80\x02t.")


def test_refused_global_names_it_and_collect_mode_goes_on() -> None:
    data = b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00ls\x85R."
    with pytest.raises(UnsafeFileError, match="os.system"):
        _run(data)
    found: list[tuple[str, str, int]] = []
    PickleVM(data, make_policy(collect(found), None)).run()
    assert found == [("os", "system", 2)]


def test_stack_global_with_computed_name_is_refused() -> None:
    # the module name comes from a REDUCE result, not a constant
    data = b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93\x8c\x02os\x85R\x8c\x06system\x93."
    found: list[tuple[str, str, int]] = []
    PickleVM(data, make_policy(collect(found), None)).run()
    assert found[0][:2] == ("builtins", "eval")
    assert found[1][0] == "<computed>"
