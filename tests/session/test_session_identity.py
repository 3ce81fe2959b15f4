"""Who a session runs as: ids and project groups read from the login data."""

from __future__ import annotations

import pytest

from casaspawner.errors import InvalidInput
from casaspawner.plan import MAX_ID, Identity
from casaspawner.session.identity import identity_from_login, parse_id, project_groups


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1001, 1001),
        ("1001", 1001),
        (" +1001 ", 1001),
        (1001.0, 1001),
        ("1001.000", 1001),
        (MAX_ID, MAX_ID),
        (str(MAX_ID), MAX_ID),
        (0, 0),
        (None, None),
        ("", None),
    ],
)
def test_ids_are_read_exactly(value, expected):
    assert parse_id(value, "uid", "alice") == expected


LARGER = "larger than the largest id (4294967294)."


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("99999999999999999999", f"is 99999999999999999999, {LARGER}"),
        (2**40, f"is 1099511627776, {LARGER}"),
        (MAX_ID + 1, f"is 4294967295, {LARGER}"),
        (1e20, LARGER),
        # Unicode digits: not an id in any login data.
        ("１２３", "is not a number."),
        ("٣", "is not a number."),
        ("1e3", "is not a number."),
        (True, "is not a number."),
        (float("nan"), "is not a number."),
        ("1001.5", "is 1001.5, not a whole number."),
        ("-5", "is -5, which is not a valid id."),
    ],
)
def test_ids_that_are_not_ids_are_one_sentence(value, expected):
    with pytest.raises(InvalidInput) as info:
        parse_id(value, "uid", "alice")
    message = str(info.value)
    assert message.startswith("The uid of alice in the login data ") and message.endswith(expected)


def test_supplemental_gids_are_checked_like_the_others():
    login = {"uid": 1001, "gid": 1001, "groups": []}
    larger = r"group id of alice in the login data is 4294967296, larger"
    with pytest.raises(InvalidInput, match=larger):
        identity_from_login("alice", supplemental_gids=[100, 2**32], **login)
    with pytest.raises(InvalidInput, match=r"group id of alice in the login data is not a number"):
        identity_from_login("alice", supplemental_gids=["１"], **login)
    identity, _ = identity_from_login("alice", supplemental_gids=["100", 200.0], **login)
    assert identity.supplemental_gids == (100, 200)
    # The plan's own check, for identities made elsewhere.
    for bad in (-1, MAX_ID + 1):
        with pytest.raises(InvalidInput, match=r"which is not an id \(0 to 4294967294\)"):
            Identity("alice", 1001, 1001, supplemental_gids=(bad,))


def test_project_groups_are_one_rule_for_both_spawners():
    usable, skipped = project_groups(
        ["/proja", "proja", "Proj", "proj", "my group", "admins", "/org/sub", 7],
        "proj.*|Proj|my group|org/sub|7",
    )
    # "/" dropped, each once, case kept.
    assert usable == ["proja", "Proj", "proj", "7"]
    assert skipped == ["my group", "org/sub"]
