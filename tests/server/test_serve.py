"""``alaya serve``: the real server (a subprocess on 127.0.0.1) and the official ``openai`` client.

A tiny random-weight model with a byte tokenizer where the text does not matter (API,
errors, concurrency, contexts in a DB on disk, SIGTERM); real SmolLM2 where it does (the
same greedy text as ``alaya generate``; a server without ``--db`` storing a 4K-token
context in memory and serving it from there).
"""

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.support.serve_process import ROOT, Server

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

KEY = "test-key-123"


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ---------------------------------------------------------------- tiny random model

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-tiny")
    srv = Server(tmp, "--random-weights", "tiny", "--db", str(tmp / "db"), "--max-tokens-limit", "1500",
                 "--max-body-bytes", "20000", key=KEY)
    yield srv
    assert srv.stop() == 0, srv.output()


def _complete(c, prompt, n, **kw):
    return c.completions.create(model="random-tiny", prompt=prompt, max_tokens=n, temperature=0, **kw)


def test_models_completion_and_chat_streamed_and_not(tiny):
    c = tiny.client()
    assert [m.id for m in c.models.list().data] == ["random-tiny"]
    r = _complete(c, "Hello there", 12)
    assert r.choices[0].finish_reason in ("length", "stop")
    u = r.usage
    assert u.prompt_tokens == len("Hello there") and u.completion_tokens >= 1
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.model_extra["reused_tokens"] == 0 and u.model_extra["ttft_s"] > 0
    chunks = list(_complete(c, "Hello there", 12, stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == r.choices[0].text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == u.completion_tokens

    msgs = [{"role": "user", "content": "Hi"}]
    ch = c.chat.completions.create(model="random-tiny", messages=msgs, max_tokens=10, temperature=0)
    assert ch.choices[0].message.role == "assistant" and ch.usage.completion_tokens >= 1
    parts = list(c.chat.completions.create(model="random-tiny", messages=msgs, max_tokens=10, temperature=0,
                                           stream=True))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == ch.choices[0].message.content
    # sampling is seeded: the same seed gives the same text
    a, b = (c.completions.create(model="random-tiny", prompt="abc", max_tokens=16, temperature=1.0, seed=5)
            for _ in range(2))
    assert a.choices[0].text == b.choices[0].text
    # a stop string ends the text before it
    full = r.choices[0].text
    if len(full) >= 4:
        stopped = _complete(c, "Hello there", 12, stop=[full[2:4]])
        assert stopped.choices[0].text == full[: full.index(full[2:4])]
        assert stopped.choices[0].finish_reason == "stop"


def test_16_concurrent_clients_equal_their_single_outputs(tiny):
    c = tiny.client()
    prompts = [f"request number {i}: " + "xyz" * (i % 5) for i in range(16)]
    n = [8 + (i % 4) * 6 for i in range(16)]
    single = [_complete(c, p, k).choices[0].text for p, k in zip(prompts, n)]
    _, before = tiny.http("GET", "/metrics")

    def one(i):
        if i % 2:
            return "".join(ch.choices[0].text for ch in _complete(c, prompts[i], n[i], stream=True))
        return _complete(c, prompts[i], n[i]).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        got = list(ex.map(one, range(16)))
    assert got == single
    status, after = tiny.http("GET", "/metrics")
    assert status == 200
    ok = 'alaya_http_requests_total{path="/v1/completions",status="200"}'
    assert _metric(after, ok) - _metric(before, ok) == 16
    assert _metric(after, "alaya_completions_total") - _metric(before, "alaya_completions_total") == 16
    assert _metric(after, "alaya_ttft_seconds_count") - _metric(before, "alaya_ttft_seconds_count") == 16
    _, health = tiny.http("GET", "/health")
    assert health["peak_active"] >= 2, health  # requests really shared decode steps


def test_a_client_that_does_not_read_does_not_block_others(tiny):
    body = json.dumps({"model": "random-tiny", "prompt": "slow reader", "max_tokens": 1500, "temperature": 0,
                       "stream": True}).encode()
    s = socket.create_connection(("127.0.0.1", tiny.port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    try:
        time.sleep(1.0)
        t = time.time()
        r = _complete(tiny.client(), "quick", 8)
        assert r.usage.completion_tokens >= 1
        assert time.time() - t < 60
    finally:
        s.close()


def test_contexts_are_stored_listed_reused_and_deleted(tiny):
    text = "The context of this test, long enough to fill a few blocks of the store. " * 3
    st, made = tiny.http("POST", "/v1/contexts", {"prompt": text, "name": "t1"})
    assert st == 200 and made["tokens"] == len(text.encode()) and not made["already_stored"], made
    cid = made["id"]
    st, again = tiny.http("POST", "/v1/contexts", {"prompt": text})
    assert st == 200 and again["id"] == cid and again["already_stored"]
    st, listed = tiny.http("GET", "/v1/contexts")
    assert st == 200 and cid in [x["id"] for x in listed["data"]]
    st, one = tiny.http("GET", f"/v1/contexts/{cid}")
    assert st == 200 and one["tokens"] == made["tokens"] and one["name"] == "t1"
    r = _complete(tiny.client(), text + "and a question?", 6)
    blocks = (len(text.encode()) // 64) * 64
    assert r.usage.model_extra["reused_tokens"] == blocks
    assert r.usage.model_extra["context_source"] == "memory:device"
    st, _ = tiny.http("DELETE", f"/v1/contexts/{cid}")
    assert st == 200
    st, gone = tiny.http("GET", f"/v1/contexts/{cid}")
    assert st == 404 and gone["error"]["code"] == "context_not_found"
    st, gone = tiny.http("DELETE", f"/v1/contexts/{cid}")
    assert st == 404
    r = _complete(tiny.client(), text + "and a question?", 6)
    assert r.usage.model_extra["reused_tokens"] == 0


def test_attention_fields_choose_the_method(tiny):
    c = tiny.client()
    full = _complete(c, "attention please", 8)
    dipr = _complete(c, "attention please", 8, extra_body={"attention": "dipr", "beta": 1e30})
    assert dipr.choices[0].text == full.choices[0].text  # an infinite range keeps every key
    stream = _complete(c, "attention please", 8, extra_body={"attention": "streaming"})
    assert stream.usage.completion_tokens >= 1
    # calibrated DIPR: βs chosen per (layer, head) from the prompt's own last queries after prefill;
    # two such requests at once share a batch, each row with its own βs
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        cal = list(ex.map(lambda p: _complete(c, p, 8, extra_body={"attention": "dipr", "dipr_mass": 0.9}),
                          ["attention please, calibrated", "another prompt to calibrate on"]))
    assert all(r.usage.completion_tokens >= 1 for r in cal)


BAD = [
    ("POST", "/v1/completions", b"{not json", 400, None),
    ("POST", "/v1/completions", b"[1, 2]", 400, None),
    ("POST", "/v1/completions", {"model": "random-tiny", "prompt": "x", "atention": "dipr"}, 400, "unrecognized"),
    ("POST", "/v1/completions", {"model": "random-tiny", "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"model": "random-tiny", "prompt": "x", "max_tokens": True}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"model": "random-tiny", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("POST", "/v1/completions", {"model": "random-tiny", "prompt": "x", "temperature": 3}, 400, "temperature"),
    ("POST", "/v1/completions", {"model": "random-tiny", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("POST", "/v1/completions", {"model": "random-tiny", "prompt": "x", "stream": "yes"}, 400, "stream"),
    ("POST", "/v1/completions", {"model": "random-tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"model": "random-tiny", "prompt": "x", "max_tokens": 1501}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"model": "random-tiny", "prompt": "x" * 2040, "max_tokens": 20}, 400, "context"),
    ("POST", "/v1/completions", {"model": "random-tiny", "prompt": ""}, 400, "empty"),
    ("POST", "/v1/completions", {"model": "random-tiny", "prompt": [1, 2, 99999]}, 400, "token ids"),
    ("POST", "/v1/completions", {"model": "random-tiny", "prompt": "x", "n": 2}, 400, "n=1"),
    ("POST", "/v1/completions", {"model": "random-tiny", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400,
     "stop"),
    ("POST", "/v1/completions", {"model": "random-tiny", "prompt": "x", "attention": "magic"}, 400, "attention"),
    ("POST", "/v1/completions", {"model": "random-tiny", "prompt": "x", "attention": 3}, 400, "attention"),
    ("POST", "/v1/completions", {"model": "random-tiny", "prompt": "x", "beta": -1}, 400, "beta"),
    ("POST", "/v1/completions", {"model": "random-tiny", "prompt": "x", "attention": "dipr", "dipr_mass": 1.5}, 400,
     "dipr_mass"),
    ("POST", "/v1/completions", {"model": "random-tiny", "prompt": "x", "attention": "topk", "dipr_keys": 0.1}, 400,
     "dipr"),
    ("POST", "/v1/completions", {"model": "other-model", "prompt": "x"}, 404, "does not exist"),
    ("POST", "/v1/completions", {"model": "random-tiny", "prompt": "x" * 30000}, 413, "bytes"),
    ("POST", "/v1/chat/completions", {"model": "random-tiny", "messages": "hi"}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"model": "random-tiny", "messages": []}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"model": "random-tiny", "messages": [{"role": "wizard", "content": "x"}]},
     400, "role"),
    ("POST", "/v1/chat/completions", {"model": "random-tiny", "messages": [{"role": "user", "content": 5}]}, 400,
     "content"),
    ("POST", "/v1/contexts", {"prompt": 5}, 400, "prompt"),
    ("POST", "/v1/contexts", {"prompt": "short"}, 400, "block"),
    ("GET", "/v1/contexts/ffffffffffffffff", None, 404, "no snapshot"),
    ("DELETE", "/v1/contexts/nope", None, 404, "no snapshot"),
    ("GET", "/v1/nothing-here", None, 404, None),
]


def test_bad_input_gets_a_4xx_error_object_never_a_500(tiny):
    for method, path, body, status, needle in BAD:
        raw = body if isinstance(body, bytes) else None
        got, out = tiny.http(method, path, None if raw else body, raw=raw)
        assert got == status, (method, path, body, got, out)
        assert isinstance(out, dict) and "message" in out["error"], (body, out)
        assert "Traceback" not in json.dumps(out)
        if needle:
            assert needle in out["error"]["message"], (body, out)
    # every route of the app but /health needs the key: none, a wrong one, another scheme, a prefix of it
    from alaya_jax.server.app import _ROUTES

    routes = [(m, r.path.replace("{id}", "abc")) for r in _ROUTES for m in r.methods if m != "HEAD"]
    assert len(routes) >= 9
    for method, path in routes:
        body = {} if method == "POST" else None
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                        {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY[:-1]}"}):
            got, out = tiny.http(method, path, body, key=False, headers=headers)
            if path == "/health":
                assert got == 200, (method, path, headers, out)
            else:
                assert got == 401 and out["error"]["type"] == "authentication_error", (method, path, headers, out)
        got, _ = tiny.http(method, path, body)
        assert got != 401, (method, path)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=tiny.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert tiny.http("GET", "/health", key=False)[0] == 200
    _, m = tiny.http("GET", "/metrics")
    assert _metric(m, "alaya_http_errors_total") >= len(BAD)
    assert "Traceback" not in tiny.output()


def test_sigterm_during_a_stream_finishes_it_and_exits_cleanly(tmp_path):
    from alaya_jax.store.context_db import ContextDB

    db = tmp_path / "db"
    srv = Server(tmp_path, "--random-weights", "tiny", "--db", str(db), "--shutdown-timeout", "60")
    try:
        st, made = srv.http("POST", "/v1/contexts", {"prompt": "stored before the signal " * 8})
        assert st == 200
        stream = srv.client().completions.create(model="random-tiny", prompt="go on", max_tokens=200,
                                                 temperature=0, stream=True)
        it = iter(stream)
        first = next(it)
        srv.proc.send_signal(signal.SIGTERM)
        rest = list(it)
        chunks = [first] + rest
        assert chunks[-1].choices[0].finish_reason == "length"
        assert srv.proc.wait(120) == 0, srv.output()
    finally:
        srv.stop()
    cat = ContextDB(db)
    assert [m.snapshot_id for m in cat.list()] == [made["id"]] and not cat.problems()
    assert not [n for n in os.listdir(db / "snapshots") if n.startswith(".")]


def test_sigterm_past_the_shutdown_timeout_cuts_the_stream_cleanly(tmp_path):
    srv = Server(tmp_path, "--random-weights", "tiny", "--shutdown-timeout", "1.5", "--max-tokens-limit", "1900")
    try:
        stream = srv.client().completions.create(model="random-tiny", prompt="go on", max_tokens=1900,
                                                 temperature=0, stream=True)
        it = iter(stream)
        next(it)
        srv.proc.send_signal(signal.SIGTERM)
        with pytest.raises(openai.APIError, match="shutting down"):
            for _ in it:
                pass
        assert srv.proc.wait(120) == 0, srv.output()
    finally:
        srv.stop()


# ---------------------------------------------------------------- real SmolLM2

@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    pytest.importorskip("gguf")
    tmp = tmp_path_factory.mktemp("serve-smol")
    srv = Server(tmp, "--memory-budget", "1GiB", timeout=600)  # no --db: contexts in memory only
    yield srv
    assert srv.stop() == 0, srv.output()


def _smol_name(srv):
    return srv.client().models.list().data[0].id


def test_greedy_text_equals_alaya_generate(smol):
    q = "What is the capital of France?"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "alaya_jax", "generate", "--prompt", q, "--max-new-tokens", "16",
                        "--json"], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    want = json.loads(r.stdout)["text"]
    c = smol.client()
    name = _smol_name(smol)
    got = c.chat.completions.create(model=name, messages=[{"role": "user", "content": q}], max_tokens=16,
                                    temperature=0)
    assert got.choices[0].message.content == want
    streamed = c.chat.completions.create(model=name, messages=[{"role": "user", "content": q}], max_tokens=16,
                                         temperature=0, stream=True)
    assert "".join(p.choices[0].delta.content or "" for p in streamed) == want
    assert "Paris" in want


def test_stored_2k_context_is_served_from_memory_5x_faster(smol):
    from alaya_jax.runtime.corpus import pydoc_topics

    ctx = pydoc_topics()[:9000]
    name = _smol_name(smol)
    c = smol.client()
    # The cold reference is the server's own prefill of the same 2K tokens (storing the context):
    # a second cold prefill through a completion would cost the suite much more on 2 CPU cores.
    st, made = smol.http("POST", "/v1/contexts", {"prompt": ctx})
    assert st == 200 and made["tokens"] >= 2000 and not made["already_stored"], made

    def ask(prefix, q):
        r = c.completions.create(model=name, prompt=prefix + "\n\n" + q, max_tokens=2, temperature=0)
        return r.usage.model_extra

    ask(ctx, "What is that about?")  # compiles the short tail's prefill at this capacity
    warm = ask(ctx, "What is this about?")
    assert warm["reused_tokens"] >= 2000 and warm["context_source"] == "memory:device", warm
    assert warm["ttft_s"] * 5 <= made["seconds"], (made, warm)
    _, health = smol.http("GET", "/health")  # started without --db: the contexts live in memory only
    db = health["context_db"]
    assert (db["kind"], db["persistent"], db["contexts"]) == ("memory", False, 1) and db["used_bytes"] > 0, health
    st, listed = smol.http("GET", "/v1/contexts")
    assert st == 200 and [x["id"] for x in listed["data"]] == [made["id"]]
    assert smol.http("DELETE", f"/v1/contexts/{made['id']}")[0] == 200
    assert smol.http("GET", "/v1/contexts")[1]["data"] == []
