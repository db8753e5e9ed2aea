"""Streamed text: UTF-8 split across tokens, stop strings split across tokens. No model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import needs_llama

pytestmark = needs_llama


def stream(pieces, stop=()):
    from decode_cpu.output_text import OutputText

    out = OutputText(stop)
    emitted, stopped = [], False
    for p in pieces:
        text, stopped = out.add(p)
        emitted.append(text)
        if stopped:
            break
    if not stopped:
        emitted.append(out.flush())
    return emitted, stopped, out


def test_multibyte_characters_split_across_tokens():
    # "é" = c3 a9, "🙂" = f0 9f 99 82
    emitted, _, _ = stream([b"caf\xc3", b"\xa9 ", b"\xf0\x9f", b"\x99", b"\x82!"])
    assert emitted == ["caf", "é ", "", "", "🙂!", ""]


def test_invalid_bytes_become_replacement_characters_and_do_not_stall_the_stream():
    emitted, _, _ = stream([b"a\xffb", b"cd"])
    assert emitted[:2] == ["a\ufffdb", "cd"]
    emitted, _, _ = stream([b"ok \xe2\x82"])  # a dangling partial character at the end
    assert "".join(emitted) == "ok \ufffd"


def test_stop_string_spanning_tokens_is_never_streamed():
    emitted, stopped, out = stream([b"Paris.", b"\n", b"\nQues", b"tion: next"], stop=["\n\nQuestion"])
    assert stopped and emitted == ["Paris.", "", "", ""] and out.text == "Paris."


def test_held_text_is_released_when_it_stops_matching():
    emitted, stopped, _ = stream([b"xa", b"c"], stop=["ab"])
    assert not stopped and emitted == ["x", "ac", ""]


def test_stop_inside_one_token_keeps_the_text_before_it():
    emitted, stopped, _ = stream([b"hello wor", b"ld END more"], stop=["END"])
    assert stopped and "".join(emitted) == "hello world "


def test_earliest_of_several_stops_wins():
    _, stopped, out = stream([b"one two three"], stop=["three", "two"])
    assert stopped and out.text == "one "


def test_flush_releases_a_partial_stop_at_the_end():
    emitted, stopped, _ = stream([b"the E"], stop=["END"])
    assert not stopped and emitted == ["the ", "E"]


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab\n é🙂")), max_size=40), data=st.data())
def test_streamed_pieces_join_to_the_text_before_the_first_stop(text, data):
    raw = text.encode()
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=12)))
    pieces = [raw[a:b] for a, b in zip([0] + cuts, cuts + [len(raw)])]
    stop = data.draw(st.sampled_from(["", "ab", "\n\n", "é🙂", "b b", "🙂"]))
    emitted, stopped, _ = stream(pieces, stop=[stop] if stop else [])
    at = text.find(stop) if stop else -1
    assert stopped == (at >= 0)
    assert "".join(emitted) == (text[:at] if at >= 0 else text)


@pytest.mark.parametrize("stop", [[""], []])
def test_empty_stop_list_or_string_never_stops(stop):
    _, stopped, out = stream([b"abc"], stop=stop)
    assert not stopped and out.text == "abc"
