"""Issue 19: a packet can be found only by someone who was given its id.

Public ids carry a 64-bit HMAC tag of the snowflake (core/ids.py PublicIds); a tag that does
not check is answered exactly like an unknown packet, and those answers cost the caller a
per-user budget (429 once spent).
"""

from __future__ import annotations

import base64

import pytest

from redpacket.core.errors import ApiError
from redpacket.core.ids import EPOCH_MS, IdGenerator, PublicIds, derive_id_key, snowflake_of
from tests.conftest import Cluster

ATTACKER = 1966
VICTIM = 1967


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def test_a_public_id_is_22_url_safe_characters_and_round_trips() -> None:
    ids = PublicIds(derive_id_key("n" * 32))
    snowflake = IdGenerator(5).next_id()
    public = ids.format(snowflake)
    assert len(public) == 22 and set(public) <= set(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    )
    assert ids.parse(public) == snowflake == snowflake_of(public)
    other_key = PublicIds(derive_id_key("m" * 32))
    with pytest.raises(ApiError) as err:
        other_key.parse(public)
    assert (err.value.status, err.value.code) == (404, "not_found")


def test_a_tampered_or_non_canonical_id_is_not_found() -> None:
    ids = PublicIds(derive_id_key("n" * 32))
    public = ids.format(IdGenerator(5).next_id())
    raw = base64.urlsafe_b64decode(public + "==")
    for bad in (
        b64(raw[:8] + bytes(8)),  # right snowflake, zero tag
        b64((int.from_bytes(raw[:8], "big") + 1).to_bytes(8, "big") + raw[8:]),  # neighbour
        public[:-1] + ("B" if public[-1] == "A" else "A"),  # last character changed
    ):
        with pytest.raises(ApiError) as err:
            ids.parse(bad)
        assert err.value.status == 404, bad


def test_legacy_decimal_ids_only_before_the_setting() -> None:
    snowflake = IdGenerator(5).next_id()
    made_ms = IdGenerator.timestamp_ms(snowflake)
    with pytest.raises(ApiError) as err:
        PublicIds(derive_id_key("n" * 32)).parse(str(snowflake))  # default: none accepted
    assert err.value.status == 404
    assert PublicIds(derive_id_key("n" * 32), made_ms + 1).parse(str(snowflake)) == snowflake
    with pytest.raises(ApiError):
        PublicIds(derive_id_key("n" * 32), made_ms).parse(str(snowflake))
    assert made_ms > EPOCH_MS


def test_packets_before_the_legacy_setting_are_given_decimal_ids_a_0_1_0_gateway_parses() -> None:
    """During a gateway roll from 0.1.0, a client answered by a new gateway may call an old
    one next: packets made before the setting get the decimal id both understand."""
    snowflake = IdGenerator(5).next_id()
    made_ms = IdGenerator.timestamp_ms(snowflake)
    during_roll = PublicIds(derive_id_key("n" * 32), made_ms + 60_000)
    assert during_roll.format(snowflake) == str(snowflake)
    assert during_roll.parse(str(snowflake)) == snowflake
    after_roll = PublicIds(derive_id_key("n" * 32), made_ms)  # set back to the roll's end
    tagged = after_roll.format(snowflake)
    assert len(tagged) == 22 and after_roll.parse(tagged) == snowflake
    assert during_roll.parse(tagged) == snowflake  # a tagged id stays valid either way


async def test_a_bad_tag_is_answered_exactly_like_an_unknown_packet(cluster: Cluster) -> None:
    real = await cluster.create(1, 100, 1)
    raw = base64.urlsafe_b64decode(real + "==")
    forged = b64(raw[:8] + bytes(8))
    unknown = cluster.public_id(snowflake_of(real) + 1)  # a valid tag, no such packet
    for path in ("", "/records"):
        got_forged = await cluster.call("GET", f"/v1/red-packets/{forged}{path}", 1968)
        got_unknown = await cluster.call("GET", f"/v1/red-packets/{unknown}{path}", 1968)
        assert got_forged == got_unknown
        assert got_forged[0] == 404 and got_forged[1]["error"]["code"] == "not_found"
    for action in ("grab", "open"):
        got_forged = await cluster.call("POST", f"/v1/red-packets/{forged}/{action}", 1968)
        got_unknown = await cluster.call("POST", f"/v1/red-packets/{unknown}/{action}", 1968)
        assert got_forged == got_unknown and got_forged[0] == 404


async def test_the_neighbour_guessing_attack_finds_nothing(cluster: Cluster) -> None:
    """The attack of the issue: packets made just before and after the victim's bound its
    millisecond; every id in between with sequence 0-1 is tried, as a decimal id, with the
    tag of a neighbour, and with no tag. Nothing is found, and the guesser is cut off."""
    before = await cluster.create(ATTACKER, 100, 1)
    victim = await cluster.create(VICTIM, 100, 1)
    after = await cluster.create(ATTACKER, 100, 1)
    low, high = snowflake_of(before), snowflake_of(after)
    generator = (low >> 12) & 0x3FF
    tag_of_before = base64.urlsafe_b64decode(before + "==")[8:]
    guesses = []
    for ms in range(low >> 22, (high >> 22) + 1):
        for seq in (0, 1, 2):
            snowflake = (ms << 22) | (generator << 12) | seq
            if snowflake in (low, high):
                continue
            body = snowflake.to_bytes(8, "big")
            guesses += [str(snowflake), b64(body + tag_of_before), b64(body + bytes(8))]
    assert snowflake_of(victim) in {snowflake_of(g) for g in guesses}  # the attack aims right
    statuses = []
    for guess in guesses[:120]:
        status, body = await cluster.call("GET", f"/v1/red-packets/{guess}", ATTACKER)
        statuses.append(status)
        assert status in (404, 429), (guess, body)
    assert 429 in statuses  # the per-user budget of unknown ids ran out
    status, _ = await cluster.call("POST", f"/v1/red-packets/{guesses[0]}/open", ATTACKER)
    assert status in (404, 429)
    status, _ = await cluster.call("GET", f"/v1/red-packets/{victim}", VICTIM)
    assert status == 200
    report = await cluster.check()
    assert report.ok
