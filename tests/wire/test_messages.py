"""Control messages: round trip, and clear rejection of anything else."""

import msgpack
import pytest

from wire import messages
from wire.messages import Admit, Finished, MessageError, Ping, Prefill, Sampling


def test_round_trip_nested_sampling():
    m = Admit(b"r" * 16, prompt="hi", sampling=Sampling(max_tokens=5, temperature=0.7, stop=["\n"]))
    back = messages.decode(messages.encode(m))
    assert isinstance(back, Admit) and back.sampling.max_tokens == 5 and back.sampling.stop == ["\n"]


def test_round_trip_every_registered_type_by_example():
    for m in (Ping(), Prefill(b"x", [1, 2, 3], "tcp://h:1"), Finished(b"x", "stop", 3, 4, {"a": 1.5})):
        assert messages.decode(messages.encode(m)) == m


def test_version_mismatch_named():
    raw = msgpack.packb({"t": "Ping", "v": 99})
    with pytest.raises(MessageError, match="same homelab-disagg version"):
        messages.decode(raw)


def test_unknown_type_and_garbage():
    with pytest.raises(MessageError, match="unknown"):
        messages.decode(msgpack.packb({"t": "Nope", "v": messages.PROTOCOL_VERSION}))
    with pytest.raises(MessageError):
        messages.decode(b"\xc1\xc1\xc1")
    with pytest.raises(MessageError, match="malformed"):
        messages.decode(msgpack.packb({"t": "Prefill", "v": messages.PROTOCOL_VERSION}))
