"""alaya_jax.server.protocol: request bodies validated into engine requests, without a server
(the same errors over HTTP are in test_serve.py)."""

import pytest

from alaya_jax.attention.config import AttentionConfig, CalibrationConfig
from alaya_jax.server import protocol
from alaya_jax.server.protocol import APIError, RequestLimits
from tests.support.fake_engine import FakeTokenizer

LIMITS = RequestLimits(max_context=64, max_prompt_tokens=48, max_tokens=32, default_max_tokens=16)
BASE = AttentionConfig(method="full", sink=2, window=8)


def request(body, ids=(1, 2, 3)):
    body = protocol.check_fields({"prompt": "p", **body}, protocol.COMPLETION_FIELDS)
    return protocol.generation_request(body, list(ids), limits=LIMITS, attention=BASE, default_max_tokens=16)


def refused(body, ids=(1, 2, 3)):
    with pytest.raises(APIError) as e:
        request(body, ids)
    assert e.value.status == 400 and e.value.body()["error"]["message"] == e.value.message
    return e.value


def test_defaults_and_sampling():
    r = request({"prompt": "abc"})
    assert (r.sampling.max_new_tokens, r.sampling.temperature, r.sampling.top_p, r.sampling.seed) == (16, 1.0, 1.0, 0)
    assert r.attention == BASE and not r.stream and r.stop == ()
    r = request({"max_tokens": 5, "temperature": 0, "top_p": 0.5, "seed": 7, "stop": "x", "stream": True,
                 "stream_options": {"include_usage": True}})
    assert (r.sampling.max_new_tokens, r.sampling.temperature, r.sampling.top_p, r.sampling.seed) == (5, 0.0, 0.5, 7)
    assert r.stop == ("x",) and r.stream and r.include_usage


def test_attention_fields_set_the_method_range_and_calibration():
    r = request({"attention": "dipr", "beta": 12})
    assert (r.attention.method, r.attention.beta, r.attention.sink) == ("dipr", 12.0, 2)
    r = request({"attention": "dipr", "dipr_keys": 0.1})
    assert r.attention.calibration == CalibrationConfig(dipr_keys=0.1) and r.attention.calibrated
    assert request({"attention": "auto"}).attention.method == "full"  # resolved for a 3-token prompt
    assert request({"attention": "topk", "tail": "none"}).attention.tail == "none"
    assert request({"attention": "topk", "tail": "estimate"}).attention.tail == "estimate"


@pytest.mark.parametrize("body,param,text", [
    ({"atention": "dipr"}, "atention", "unrecognized request argument"),
    ({"beta": "big"}, "beta", "must be a finite number"),
    ({"max_tokens": True}, "max_tokens", "must be an integer"),
    ({"attention": "nope"}, "attention", "unknown attention 'nope'"),
    ({"tail": "exact-scores"}, "tail", "unknown tail 'exact-scores'; choose one of none, estimate"),  # study only
    ({"tail": 1}, "tail", "must be a string"),
    ({"temperature": 10**400}, "temperature", "between 0 and 2"),
    ({"top_p": float("nan")}, "top_p", "(0, 1]"),
    ({"beta": float("inf")}, "beta", "finite"),
    ({"beta": 10**400}, "beta", "finite"),
    ({"dipr_mass": True}, "dipr_mass", "must be a finite number"),
    ({"seed": 2**64}, "seed", "between 0 and"),
    ({"max_tokens": 5.0}, "max_tokens", "must be an integer"),
    ({"stop": "\ud800"}, "stop", "lone surrogate"),
    ({"stop": "x" * 257}, "stop", "non-empty string"),
    ({"stream_options": {"include_usage": 1}}, "stream_options.include_usage", "a boolean"),
    ({"dipr_mass": 1.5}, "dipr_mass", "bad attention settings: dipr_mass must be in"),
    ({"attention": "dipr", "dipr_mass": 1.5}, "method", "dipr_mass must be in"),  # param: the first field given
    ({"attention": "topk", "dipr_keys": 0.1}, "method", "cannot be used with method 'topk'"),
    ({"max_tokens": 33}, "max_tokens", "between 1 and 32"),
    ({"temperature": 2.5}, "temperature", "between 0 and 2"),
    ({"top_p": 0}, "top_p", "(0, 1]"),
    ({"n": 2}, "n", "only n=1"),
    ({"stop": ["a", ""]}, "stop[1]", "non-empty"),
    ({"stream_options": {"x": 1}}, "stream_options", "include_usage"),
])
def test_bad_fields_are_named(body, param, text):
    e = refused(body)
    assert e.param == param and text in e.message


def test_prompt_limits_and_ids():
    assert refused({}, ids=[1] * 49).code == "context_length_exceeded"
    e = refused({"max_tokens": 30}, ids=[1] * 40)
    assert e.code == "context_length_exceeded" and "70, more than the context of 64" in e.message
    assert refused({}, ids=[]).param == "prompt"
    tok = FakeTokenizer()

    def ids(body):
        return protocol.completion_prompt_ids(protocol.check_fields(body, protocol.COMPLETION_FIELDS), tok)

    assert ids({"prompt": "abc"}) == [0, 1, 2]
    assert ids({"prompt": [[4, 5]]}) == [4, 5]
    with pytest.raises(APIError, match=r"token ids must be integers in \[0, 26\)"):
        ids({"prompt": [1, 26]})
    for bad, text in [({}, "'prompt' is required"), ({"prompt": [True]}, "prompt"), ({"prompt": [1, -1]}, "prompt"),
                      ({"prompt": [[1], [2]]}, "prompt"), ({"prompt": {"a": 1}}, "must be a string, an array")]:
        with pytest.raises(APIError, match=text):
            ids(bad)


def test_chat_messages():
    tok = FakeTokenizer()

    def ids(msgs):
        return protocol.chat_prompt_ids(protocol.check_fields({"messages": msgs}, protocol.CHAT_FIELDS), tok)

    msgs = [{"role": "system", "content": "ab"}, {"role": "user", "content": [{"type": "text", "text": "cd"}]}]
    assert ids(msgs) == [0, 1, 2, 3]
    for bad, text in [([], "non-empty"), ([{"role": "tool", "content": "x"}], "unsupported role"),
                      ([{"role": "assistant", "content": "x"}], "the last message must be the user's"),
                      ([{"role": "user", "content": 3}], "must be a string or text parts"),
                      ([{"role": "user"}], "'messages\\[0\\].content' is required"),
                      ([{"role": "user", "content": "x", "extra": 1}], "unrecognized field 'extra'"),
                      ([{"role": "user", "content": [{"type": "image_url", "text": "x"}]}], "unsupported content"),
                      (["hi"], "'messages\\[0\\]' must be an object")]:
        with pytest.raises(APIError, match=text):
            ids(bad)
