"""Control messages: round trip, the byte layout pinned, and clear rejection of anything else:
every input either decodes to a message with the declared field types or raises MessageError."""

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wire import messages
from wire.messages import (
    Admit, Capabilities, DecodeTimings, Finished, MessageError, Ping, Pong, Prefill, Sampling,
)

V = messages.PROTOCOL_VERSION
pack = msgspec.msgpack.encode  # a peer's raw map, written by hand


def test_round_trip_nested_sampling():
    m = Admit(b"r" * 16, prompt="hi", sampling=Sampling(max_tokens=5, temperature=0.7, stop=("\n",)))
    back = messages.decode(messages.encode(m))
    assert isinstance(back, Admit) and back.sampling.max_tokens == 5 and back.sampling.stop == ("\n",)


def test_round_trip_every_registered_type_by_example():
    pong = Pong("prefill", "p", "0.1.0", b"\x01" * 16, "m", capabilities=Capabilities("torch", ("f16",), True))
    for m in (Ping(), Prefill(b"x", [1, 2, 3], "tcp://h:1"), Finished(b"x", "stop", 3, 4, DecodeTimings(decode_ms=1.5)),
              pong):
        assert messages.decode(messages.encode(m)) == m


def test_bytes_pinned():
    """A map: the type tag first, the fields in their declared order, the version last."""
    assert messages.encode(messages.Cancel(b"\x01\x02")) == (
        b"\x83\xa1t\xa6Cancel\xaarequest_id\xc4\x02\x01\x02\xa1v" + bytes([V])
    )


def test_a_peer_map_with_an_int_for_a_float_and_a_list_for_a_tuple_decodes():
    raw = pack({"t": "Admit", "v": V, "request_id": b"r", "sampling": {"temperature": 1, "stop": ["\n"]}})
    assert messages.decode(raw).sampling == Sampling(temperature=1.0, stop=("\n",))


def test_version_mismatch_named():
    with pytest.raises(MessageError, match="same homelab-disagg version"):
        messages.decode(pack({"t": "Ping", "v": 99}))
    with pytest.raises(MessageError, match="protocol vNone"):
        messages.decode(pack({"t": "Ping"}))


def test_unknown_type_and_garbage():
    with pytest.raises(MessageError, match="unknown"):
        messages.decode(pack({"t": "Nope", "v": V}))
    with pytest.raises(MessageError, match="not a msgpack map"):
        messages.decode(b"\xc1\xc1\xc1")
    with pytest.raises(MessageError, match="Prefill message is malformed.*request_id"):
        messages.decode(pack({"t": "Prefill", "v": V}))


@pytest.mark.parametrize("fields, named", [
    ({"t": {}}, "type {} is unknown"),  # a map as the type tag (unhashable)
    ({"t": ["Ping"]}, "is unknown"),
    ({"t": "Message"}, "is unknown"),  # the base class is no message
    ({"t": "Admit", "request_id": b"r", "sampling": {"bogus": 1}}, "unknown field `bogus` - at `\\$.sampling`"),
    ({"t": "Admit", "request_id": b"r", "messages": 1.5}, "got `float` - at `\\$.messages`"),
    ({"t": "Admit", "request_id": b"r", "messages": [{"role": 1}]}, "at `\\$.messages\\[0\\]"),
    ({"t": "Admit", "request_id": b"r", "token_ids": ["a"]}, "at `\\$.token_ids\\[0\\]`"),
    ({"t": "Admit", "request_id": b"r", "token_ids": [True]}, "got `bool`"),
    ({"t": "Admit", "request_id": b"r", "kv_source": "elsewhere"}, "kv_source"),
    ({"t": "Admit", "request_id": "r"}, "Expected `bytes`, got `str` - at `\\$.request_id`"),
    ({"t": "Prefill", "request_id": b"r", "token_ids": "abc", "kv_addr": "tcp://h:1"}, "token_ids"),
    ({"t": "Prefill", "request_id": b"r", "token_ids": [1], "kv_addr": 5}, "kv_addr"),
    ({"t": "Ping", "extra": 1}, "unknown field `extra`"),
    ({"t": "Pong", "role": "decode", "name": "n", "version": "", "fingerprint": b"", "model_name": "",
      "extra": {"first_token": True}}, "unknown field `extra`"),  # the old free-form map is gone
    ({"t": "Ping", "v": float(V)}, "Expected `int`, got `float` - at `\\$.v`"),
])
def test_wrong_types_are_refused_naming_the_field(fields, named):
    with pytest.raises(MessageError, match=named):
        messages.decode(pack({"v": V, **fields}))


@pytest.mark.parametrize("raw", [
    b"",
    b"\x93",  # an array of three, cut off
    b"\xdf\xff\xff\xff\xff",  # a map announcing 4G entries, none there
    b"\x83\xa1t\xa4Ping\xa1v" + bytes([V]) + b"\xa1x" + b"\x91" * 100_000 + b"\xc0",  # nested past any depth
    b"\x82\xa1t" + b"\x91" * 100_000 + b"\xc0" + b"\xa1v" + bytes([V]),
    pack({"t": "Ping", "v": V}) + b"junk",
    pack({1: 2, "t": "Ping", "v": V}),
])
def test_malformed_bytes_are_message_errors(raw):
    with pytest.raises(MessageError):
        messages.decode(raw)


def test_quoted_peer_values_are_cut_short():
    with pytest.raises(MessageError) as e:
        messages.decode(pack({"t": "x" * 100_000, "v": V}))
    assert len(str(e.value)) < 2 * messages.MAX_QUOTE_CHARS


_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_FIELD_NAMES = sorted({f for cls in messages._TYPES.values() for f in cls.__struct_fields__}
                      | {f for cls in (Sampling, Capabilities, DecodeTimings) for f in cls.__struct_fields__})


@settings(max_examples=400, deadline=None)
@given(t=st.sampled_from(sorted(messages._TYPES)) | _VALUES,
       fields=st.dictionaries(st.sampled_from(_FIELD_NAMES) | st.text(max_size=6), _VALUES, max_size=6))
def test_any_map_decodes_to_its_declared_types_or_is_a_message_error(t, fields):
    try:
        msg = messages.decode(pack({**fields, "t": t, "v": V}))
    except MessageError:
        return
    assert type(msg).__name__ == t
    raw = messages.encode(msg)  # what decoded has the declared types: it encodes, and decodes the same
    assert messages.encode(messages.decode(raw)) == raw


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_decode_or_are_a_message_error(raw):
    try:
        messages.decode(raw)
    except MessageError:
        pass
