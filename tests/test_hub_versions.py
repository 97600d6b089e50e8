"""npm ``engines`` ranges as the node step reads them (configurable-http-proxy's and its
dependencies' node ranges), and versions as programs print them."""

from __future__ import annotations

import pytest

from tasks.hub.versions import parse_version, satisfies


@pytest.mark.parametrize("spec, meets, misses", [
    # a caret below 1.0 allows patches only within the minor
    ("^0.5", ["0.5.0", "0.5.9"], ["0.6.0", "0.9.0", "1.0.0", "0.4.9"]),
    ("^20.12", ["20.12.0", "20.19.1"], ["20.11.9", "21.0.0"]),
    ("~1.2", ["1.2.0", "1.2.9"], ["1.3.0", "1.1.9"]),
    ("~1.2.3", ["1.2.3", "1.2.9"], ["1.2.2", "1.3.0"]),
    ("1.2.3 - 2.3.4", ["1.2.3", "2.3.4"], ["1.2.2", "2.3.5"]),
    ("1.2.3 - 2.3", ["2.3.9"], ["2.4.0"]),  # a partial upper end covers its whole minor
    ("^14.18.0 || >=16.0.0", ["14.18.0", "14.99.0", "16.0.0", "22.1.0"],
     ["14.17.9", "15.0.0"]),
    (">=20 <23", ["20.0.0", "22.99.0"], ["19.9.9", "23.0.0"]),
    (">= 20.0.0", ["20.0.0"], ["19.0.0"]),  # npm allows a space after the operator
    (">=v18.0.0", ["18.0.0"], ["17.9.0"]),
    ("20.x", ["20.0.0", "20.9.1"], ["21.0.0"]),
    ("*", ["0.0.1", "22.0.0"], []),
    ("", ["22.0.0"], []),  # no range: any node
    # bounds that name a pre-release
    (">=22.0.0-rc.1", ["22.0.0", "22.1.0"], ["21.9.9"]),
    ("<22.0.0-rc.1", ["21.9.9"], ["22.0.0"]),
    ("1.0.0-beta.2 - 1.2", ["1.0.0", "1.2.5"], ["0.9.0", "1.3.0"]),
    ("not a range", [], ["22.0.0"]),  # npm cannot read it: no node meets it
])
def test_npm_engine_ranges_read_as_npm_reads_them(spec, meets, misses):
    for version in meets:
        assert satisfies(parse_version(version), spec), f"{version} should meet {spec!r}"
    for version in misses:
        assert not satisfies(parse_version(version), spec), f"{version} should miss {spec!r}"


def test_versions_as_programs_print_them():
    assert parse_version("v20.19.2\n") == (20, 19, 2)
    assert parse_version("22.0.0-rc.1") == (22, 0, 0)
    assert parse_version("18.19.0+dfsg-6~deb12u2") == (18, 19, 0)
    assert satisfies((20,), ">=20.0.0") and satisfies((20, 1), "^20.1.0")
    with pytest.raises(ValueError):
        parse_version("node")
