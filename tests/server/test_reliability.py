"""``alaya serve`` under bad input, races, crashes and a full disk (issue 22), against real
servers (tiny random model, byte tokenizer) on loopback addresses.

One server for the request tests (on 127.0.0.2 without an API key: 127/8 is loopback);
one test kills a server with SIGKILL while it stores a context and restarts it on the same
DB under a file-size limit, where the next store fails for want of space.
"""

import concurrent.futures
import json
import os
import signal
import threading
import time

import hypothesis
import pytest

from tests.support.serve_process import Server

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

HOST = "127.0.0.2"
MAX_TOKENS = 3


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-reliability")
    s = Server(tmp, "--random-weights", "tiny", "--db", str(tmp / "db"), "--max-tokens-limit", str(MAX_TOKENS),
               "--max-prompt-tokens", "300", "--max-body-bytes", "200000", "--max-batch", "2", host=HOST)
    yield s
    assert s.stop() == 0, s.output()
    assert "Traceback" not in s.output()


def _ok_or_4xx(srv, method, path, body=None, raw=None):
    status, out = srv.http(method, path, body, raw=raw)
    assert status < 500, (path, body if raw is None else raw[:200], status, out)
    if status >= 400:
        assert isinstance(out, dict) and isinstance(out["error"]["message"], str), out
        assert "Traceback" not in out["error"]["message"]
    return status, out


HUGE = "1" + "0" * 400
# raw bodies: JSON as Python's parser reads it (NaN, Infinity, 400-digit integers)
RAW_BAD = [
    ("/v1/completions", '{"prompt": "x", "temperature": %s}' % HUGE, "temperature"),
    ("/v1/completions", '{"prompt": "x", "top_p": %s}' % HUGE, "top_p"),
    ("/v1/completions", '{"prompt": "x", "beta": %s}' % HUGE, "beta"),
    ("/v1/completions", '{"prompt": "x", "beta": -%s}' % HUGE, "beta"),
    ("/v1/completions", '{"prompt": "x", "dipr_mass": %s}' % HUGE, "dipr_mass"),
    ("/v1/completions", '{"prompt": "x", "seed": %s}' % HUGE, "seed"),
    ("/v1/completions", '{"prompt": "x", "max_tokens": %s}' % HUGE, "max_tokens"),
    ("/v1/completions", '{"prompt": [%s]}' % HUGE, "prompt[0]"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "temperature": %s}' % HUGE,
     "temperature"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "top_p": %s}' % HUGE, "top_p"),
    ("/v1/completions", '{"prompt": "x", "temperature": NaN}', "temperature"),
    ("/v1/completions", '{"prompt": "x", "top_p": Infinity}', "top_p"),
    ("/v1/completions", '{"prompt": "x", "beta": -Infinity}', "beta"),
    ("/v1/completions", '{"prompt": "x", "frequency_penalty": NaN}', "frequency_penalty"),
    ("/v1/completions", '{"prompt": "x", "temperature": true}', "temperature"),
    ("/v1/completions", '{"prompt": "x", "seed": 1.5}', "seed"),
    ("/v1/completions", '{"prompt": "x", "max_tokens": 2.0}', "max_tokens"),
    ("/v1/completions", '{"prompt": "x", "stop": "\\ud800"}', "stop"),
    ("/v1/completions", '{"prompt": "\\udfff"}', "prompt"),
    ("/v1/completions", '{"prompt": "x", "stop": ["a", 1]}', "stop[1]"),
    ("/v1/completions", '{"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', "stop"),
    ("/v1/completions", '{"prompt": "x", "stop": "%s"}' % ("s" * 1000), "stop"),
    ("/v1/completions", '{"prompt": "x", "stream_options": {"include_usage": "yes"}}',
     "stream_options.include_usage"),
    ("/v1/completions", '{"prompt": "x", "stream_options": [1]}', "stream_options"),
    ("/v1/completions", '{"prompt": []}', "prompt"),
    ("/v1/completions", '{"prompt": [[]]}', "prompt[0]"),
    ("/v1/completions", '{"prompt": [1, true]}', "prompt[1]"),
    ("/v1/completions", '{"prompt": %s}' % json.dumps(list(range(5000))), "prompt"),
    ("/v1/completions", '{"prompt": {"text": "x"}}', "prompt"),
    ("/v1/completions", '{"prompt": "x", "model": 7}', "model"),
    ("/v1/completions", '{"prompt": "x", "user": ["u"]}', "user"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}',
     "messages[0].content[0].text"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x", "name": {"a": 1}}]}',
     "messages[0].name"),
    ("/v1/chat/completions", '{"messages": [{"role": ["user"], "content": "x"}]}', "messages[0].role"),
    ("/v1/chat/completions", '{"messages": [null]}', "messages[0]"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud83d"}]}', "messages[0].content"),
    ("/v1/chat/completions", '{"messages": {"role": "user"}}', "messages"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "logprobs": 1}', "logprobs"),
    ("/v1/contexts", '{"prompt": "%s", "name": "a\\u0000b"}' % ("x" * 100), "name"),
    ("/v1/contexts", '{"prompt": "%s", "name": "line\\nbreak"}' % ("x" * 100), "name"),
    ("/v1/contexts", '{"prompt": "%s", "name": ""}' % ("x" * 100), "name"),
    ("/v1/contexts", '{"prompt": "%s", "chat": 1}' % ("x" * 100), "chat"),
    ("/v1/contexts", '{"prompt": "\\ud800%s"}' % ("x" * 100), "prompt"),
    ("/v1/contexts", '{"name": "n"}', "prompt"),
    ("/v1/completions", "[" * 50_000 + "]" * 50_000, None),  # nested too deeply for the parser
    ("/v1/completions", '{"prompt": "x"' + ', "prompt": "y"' * 3 + "}", None),  # repeated key: the last one
]


def test_malformed_values_are_400_naming_the_field(srv):
    for path, raw, param in RAW_BAD:
        status, out = _ok_or_4xx(srv, "POST", path, raw=raw.encode())
        if param is None:
            continue
        assert status == 400, (raw[:120], out)
        assert out["error"]["param"] == param, (raw[:120], out)
        assert out["error"]["type"] == "invalid_request_error"
        assert "/" not in out["error"]["message"], out  # no server paths
    status, health = srv.http("GET", "/health")  # open without a key: no paths either
    assert status == 200 and health["context_db"]["kind"] == "disk" and "/" not in json.dumps(health), health


def test_unicode_and_control_characters_in_stop_strings_work(srv):
    for stop in ["\n", "\x00", "\u202e", "\U0001F600", "é\t", ["\x7f", "\ufeff", "ü"]]:
        status, out = _ok_or_4xx(srv, "POST", "/v1/completions", {"prompt": "stop here", "max_tokens": MAX_TOKENS,
                                                                  "temperature": 0, "stop": stop})
        assert status == 200, out
    status, _ = _ok_or_4xx(srv, "POST", "/v1/completions", {"prompt": "x", "stop": []})  # an empty list: no stops
    assert status == 200


# ---------------------------------------------------------------- property-based: malformed bodies per endpoint

st = hypothesis.strategies  # hypothesis is a dev dependency (pyproject.toml)

LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([10**400, -(10**400), 2**63, 2**31, -1, 0, 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["\ud800", "\x00", "\u202e", "a\nb", "\U0001F600", "dipr", "full", "user", "text", ""]),
)
VALUES = st.recursive(LEAVES, lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                      max_leaves=10)
ENDPOINTS = {
    "/v1/completions": ({"prompt": "hi", "max_tokens": 1},
                        ["prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options",
                         "n", "user", "presence_penalty", "frequency_penalty", "attention", "beta", "dipr_mass",
                         "dipr_keys", "echo", "logprobs", "suffix", "best_of", "model"]),
    "/v1/chat/completions": ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
                             ["messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
                              "stream", "logprobs", "top_logprobs", "beta", "attention", "model"]),
    "/v1/contexts": ({"prompt": "a context of a few blocks " * 4}, ["prompt", "name", "chat"]),
}


def _bodies(base, fields):
    keys = st.sampled_from(fields + ["bogus", ""])
    message = st.fixed_dictionaries({"role": VALUES, "content": VALUES})
    change = st.dictionaries(keys, VALUES | st.lists(message, max_size=2), min_size=1, max_size=3)
    return st.one_of(
        change.map(lambda c: {**base, **c}),  # a valid body with one to three fields replaced
        VALUES,  # not even an object
    )


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_generated_malformed_bodies_never_get_a_5xx(srv, path):
    base, fields = ENDPOINTS[path]
    seen = {"4xx": 0, "2xx": 0}

    @hypothesis.settings(max_examples=100, deadline=None, database=None, derandomize=True,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(body=_bodies(base, fields), raw=st.none() | st.binary(max_size=40))
    def one(body, raw):
        data = raw if raw is not None else json.dumps(body).encode()  # NaN / Infinity written as Python does
        status, _ = _ok_or_4xx(srv, "POST", path, raw=data)
        seen["4xx" if status >= 400 else "2xx"] += 1

    t0 = time.monotonic()
    one()
    assert seen["4xx"] >= 30, seen  # most generated bodies are bad ones
    assert time.monotonic() - t0 < 120
    assert srv.proc.poll() is None and srv.http("GET", "/health")[0] == 200


# ---------------------------------------------------------------- names under races

def test_racing_saves_of_one_context_keep_both_names(srv):
    text = "A context stored twice at once under two names, long enough for a few blocks. " * 2
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        got = list(ex.map(lambda n: _ok_or_4xx(srv, "POST", "/v1/contexts", {"prompt": text, "name": n}),
                          ["first", "second"]))
    (s1, a), (s2, b) = got
    assert s1 == s2 == 200 and a["id"] == b["id"], got
    assert sorted([a["already_stored"], b["already_stored"]]) == [False, True], got
    status, entry = srv.http("GET", f"/v1/contexts/{a['id']}")
    assert status == 200 and {entry["name"], *entry["aliases"]} == {"first", "second"}, entry
    for ref in ("first", "second"):  # either name finds it
        assert srv.http("GET", f"/v1/contexts/{ref}")[1]["id"] == a["id"]
    status, again = srv.http("POST", "/v1/contexts", {"prompt": text, "name": "second"})
    assert again["already_stored"] and again["aliases"] == entry["aliases"]  # a name it has: nothing added


# ---------------------------------------------------------------- binding

def test_non_loopback_host_without_a_key_is_refused_at_start(monkeypatch, capsys):
    from alaya_jax import cli

    monkeypatch.delenv("ALAYA_API_KEY", raising=False)
    for host in ("0.0.0.0", "::", "192.168.1.1"):
        # refused before the model is loaded or anything is bound
        assert cli.main(["serve", "--random-weights", "tiny", "--host", host, "--port", "0"]) == 2
        err = capsys.readouterr().err
        assert err.count("alaya: error:") == 1 and "refusing to serve" in err and "--allow-unauthenticated" in err


def test_loopback_addresses():
    from alaya_jax.cli.serve import check_bind, is_loopback
    from alaya_jax.errors import UserError

    for host in ("127.0.0.1", "127.0.0.2", "127.255.255.254", "::1", "[::1]", "::ffff:127.0.0.9", "localhost"):
        assert is_loopback(host), host
        check_bind(host, api_key=None, allow_unauthenticated=False)
    for host in ("0.0.0.0", "::", "", "10.1.2.3", "128.0.0.1", "192.168.0.1", "fe80::1", "no-such-host.invalid"):
        assert not is_loopback(host), host
        with pytest.raises(UserError, match="without an API key"):
            check_bind(host, api_key=None, allow_unauthenticated=False)
        check_bind(host, api_key="k", allow_unauthenticated=False)
        check_bind(host, api_key=None, allow_unauthenticated=True)


# ---------------------------------------------------------------- crash, restart, full disk

FSIZE = 64 << 10  # bytes: a stored context of the tiny model holds a larger file


def _tmp_dirs(db):
    return [n for n in os.listdir(db / "snapshots") if n.startswith(".tmp-") and not n.endswith((".lock", ".new"))]


def test_sigkill_during_a_store_then_restart_on_a_full_disk(tmp_path):
    db = tmp_path / "db"
    kept = "A context stored before the crash, long enough for a few blocks of the store. " * 4
    lost = "A context whose store is killed half-way through writing it, so it is never seen. " * 5
    s1 = Server(tmp_path, "--random-weights", "tiny", "--db", str(db))
    try:
        status, made = s1.http("POST", "/v1/contexts", {"prompt": kept, "name": "kept"})
        assert status == 200, made
        def store_lost():
            try:
                s1.http("POST", "/v1/contexts", {"prompt": lost})
            except OSError:  # the server is killed under it
                pass

        t = threading.Thread(target=store_lost, daemon=True)
        t.start()
        t0 = time.monotonic()
        while not _tmp_dirs(db) and time.monotonic() - t0 < 60:  # the save's temporary directory appears
            time.sleep(0.002)
        s1.proc.send_signal(signal.SIGKILL)
        s1.proc.wait(30)
    finally:
        s1.stop()
    assert _tmp_dirs(db), "the store finished before it could be killed"
    debris = _tmp_dirs(db)

    s2 = Server(tmp_path, "--random-weights", "tiny", "--db", str(db), file_size_limit=FSIZE)
    try:
        # opening the DB removed the killed save's temporary directory (its writer is gone)
        assert not _tmp_dirs(db) and not set(debris) & set(os.listdir(db / "snapshots"))
        status, listed = s2.http("GET", "/v1/contexts")
        assert status == 200 and [c["id"] for c in listed["data"]] == [made["id"]], listed
        # the same store again, now on a "full" disk: 507, the cause, no paths; nothing left behind
        status, out = s2.http("POST", "/v1/contexts", {"prompt": lost})
        assert status == 507, out
        err = out["error"]
        assert err["code"] == "insufficient_storage" and "file too large" in err["message"], err
        assert str(tmp_path) not in json.dumps(out) and "/" not in err["message"], err
        assert not _tmp_dirs(db)
        # ... and the server keeps serving: health, completions, listings
        assert s2.http("GET", "/health")[0] == 200
        status, r = s2.http("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert status == 200 and r["usage"]["completion_tokens"] >= 1, r
        assert s2.http("GET", f"/v1/contexts/{made['id']}")[1]["name"] == "kept"
    finally:
        code = s2.stop()
    log = s2.output()
    assert code == 0, log
    assert "Traceback" not in log and "Event loop is closed" not in log, log[-3000:]
    assert str(db) in log  # the details (the DB's path) are in the server's log
    # what was stored before the crash is whole
    from alaya_jax.store.context_db import ContextDB

    assert ContextDB(db).show(made["id"], verify=True).num_tokens == made["tokens"]
