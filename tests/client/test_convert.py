"""The client's argument conversion: values protobuf cannot hold fail with the argument named."""

from __future__ import annotations

import pytest

from loftey.client.convert import build_generate_fields, build_prompt


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"top_k": -1}, "top_k cannot be -1"),
        ({"seed": 2**64}, "seed cannot be 18446744073709551616"),
        ({"max_new_tokens": -3}, "max_new_tokens cannot be -3"),
        ({"stop_token_ids": [-5]}, "stop_token_ids cannot be [-5]"),
        ({"logprobs": -1}, "logprobs cannot be -1"),
        ({"temperature": "hot"}, "temperature cannot be 'hot'"),
    ],
)
def test_generate_fields_name_the_argument(arguments: dict, message: str):
    with pytest.raises(ValueError) as failure:
        build_generate_fields(**arguments)
    assert message in str(failure.value)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"token_ids": [-1]}, "token_ids cannot be [-1]"),
        ({"messages": [{"role": "user"}]}, "messages[0] must have 'role' and 'content', got keys ['role']"),
        ({"messages": [{"role": "user", "content": "Hi"}, "abc"]}, "messages[1] must be a mapping or a (role, content) pair"),
        ({"messages": [("user", 5)]}, "messages[0].content cannot be 5"),
    ],
)
def test_prompt_arguments_name_the_argument(arguments: dict, message: str):
    with pytest.raises(ValueError) as failure:
        build_prompt(**arguments)
    assert message in str(failure.value)


def test_long_bad_value_is_shortened():
    with pytest.raises(ValueError) as failure:
        build_prompt(token_ids=[-1] * 10_000)
    assert len(str(failure.value)) < 300
