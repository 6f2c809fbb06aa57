"""Invalid sampling values raise ValueError naming the field; greedy clears the filters."""

import pytest

from jaxllm import SamplingParams

BAD = [
    ("n", 0), ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("min_p", 1.5),
    ("presence_penalty", 2.5), ("frequency_penalty", -3.0), ("repetition_penalty", 0.0), ("max_tokens", 0),
    ("min_tokens", -1), ("logprobs", -1), ("prompt_logprobs", -2), ("stop", [""]), ("stop_token_ids", [-1]),
    ("seed", "x"),
]


@pytest.mark.parametrize("field,value", BAD)
def test_invalid_value_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)


def test_normalisation():
    p = SamplingParams(temperature=0.0, top_p=0.5, top_k=5, min_p=0.1, stop="###")
    assert (p.top_p, p.top_k, p.min_p, p.stop) == (1.0, 0, 0.0, ["###"])
    assert SamplingParams(top_k=-1).top_k == 0
