"""Refusal codes: a worker's refusal travels as its error class's code and comes back as that class,
which alone picks the HTTP status; the words of the message play no part."""

import pytest

from coordinator.server import api_error_from
from homelab_disagg.errors import CapacityError, PromptTooLong, RequestError, error_for_code


@pytest.mark.parametrize("cls, status, api_code", [
    (PromptTooLong, 400, "context_length_exceeded"),
    (RequestError, 400, "invalid_request"),
    (CapacityError, 503, "no_capacity"),
])
def test_a_code_comes_back_as_its_class_and_status_whatever_the_words(cls, status, api_code):
    err = error_for_code(cls.code, "reworded: nothing here says it does not fit or is at capacity")
    assert type(err) is cls
    api = api_error_from(err)
    assert (api.status, api.code) == (status, api_code)


def test_an_unknown_code_is_the_request_s_fault():
    err = error_for_code("model", "the model's chat template is not supported by llama.cpp; send a plain prompt")
    assert type(err) is RequestError and api_error_from(err).status == 400


def test_codes_are_distinct():
    assert len({PromptTooLong.code, RequestError.code, CapacityError.code}) == 3
