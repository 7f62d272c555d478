"""alaya_jax.server.scheduler against a model-free engine (tests/support/fake_engine.py):
continuous batching, batch re-layouts, stop ids and strings, cancellation, refusals.
The end-to-end behaviour over HTTP with a real model is in test_serve.py."""

import queue

import pytest

from alaya_jax.attention.config import AttentionConfig, CalibrationConfig
from alaya_jax.errors import ConfigError
from alaya_jax.runtime.sampling import SamplingConfig
from alaya_jax.server.scheduler import BatchLimits, GenerationJob, Scheduler, TextStream, capacity_bucket
from tests.support.fake_engine import FakeEngine, FakeTokenizer, next_token

FULL = AttentionConfig(method="full")


def expected_text(prompt, n):
    out, t = [], prompt[-1]
    for _ in range(n):
        t = next_token(t)
        out.append(t)
    return FakeTokenizer().decode(out)


class Collector:
    def __init__(self):
        self.q = queue.Queue()

    def __call__(self, ev):
        self.q.put(ev)

    def wait(self, timeout=60):
        text = ""
        while True:
            ev = self.q.get(timeout=timeout)
            if ev.kind == "token":
                text += ev.text
            else:
                return text, ev


def job(ids, n, *, attention=FULL, stop=(), emit=None):
    return GenerationJob(ids=list(ids), sampling=SamplingConfig(max_new_tokens=n, temperature=0.0),
                         attention=attention, emit=emit or Collector(), stop=tuple(stop))


@pytest.fixture
def scheduler():
    made = []

    def make(max_batch=4, tok=None):
        s = Scheduler(FakeEngine(), tok or FakeTokenizer(), limits=BatchLimits(max_batch=max_batch, max_context=512,
                                                                                min_capacity=16))
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop(timeout=10)
    for s in made:
        assert s.error is None, s.error


def test_jobs_submitted_together_share_decode_steps(scheduler):
    s = scheduler()
    jobs = [job([i, i + 1, i + 2], 12 + i) for i in range(3)]
    for j in jobs:  # queued before the loop starts: admitted together
        s.submit(j)
    s.start()
    for i, j in enumerate(jobs):
        text, done = j.emit.wait()
        assert text == expected_text(j.ids, 12 + i) and done.finish_reason == "length"
        assert done.usage["completion_tokens"] == 12 + i and done.usage["prompt_tokens"] == 3
    assert s.peak_active == 3
    assert s.steps < sum(12 + i for i in range(3)) - 3  # shared steps, not one per token
    assert max(s.engine.decode_batches) == 4  # 3 sequences in a batch of 4 slots


def test_a_join_and_leaves_relayout_the_batch_without_changing_outputs(scheduler):
    s = scheduler(max_batch=4)
    s.start()
    first = job([1, 2], 40)
    s.submit(first)
    later = [job([5] * (30 + 20 * i), 10 + i) for i in range(3)]  # longer prompts: capacity grows
    for j in later:
        s.submit(j)
    for j in [first, *later]:
        text, done = j.emit.wait()
        assert text == expected_text(j.ids, j.sampling.max_new_tokens) and done.finish_reason == "length"
    assert s.load()["active"] == 0


def test_other_attention_waits_for_the_batch_to_drain(scheduler):
    s = scheduler()
    a, b = job([1], 8), job([2], 8, attention=AttentionConfig(method="topk", budget=4))
    s.submit(a)
    s.submit(b)
    s.start()
    assert a.emit.wait()[1].finish_reason == "length" and b.emit.wait()[1].finish_reason == "length"
    assert s.peak_active == 1


def test_calibrated_jobs_calibrate_and_batch_their_betas(scheduler):
    s = scheduler()
    cal = AttentionConfig(method="dipr", calibration=CalibrationConfig(dipr_mass=0.9))
    jobs = [job([3, 4, 5], 6, attention=cal), job([7, 8], 5, attention=cal)]
    for j in jobs:
        s.submit(j)
    s.start()
    for j in jobs:
        text, done = j.emit.wait()
        assert text == expected_text(j.ids, j.sampling.max_new_tokens)
    assert s.engine.calibrations == 2 and s.peak_active == 2


def test_stop_id_and_stop_string_end_the_text(scheduler):
    tok = FakeTokenizer()
    tok.stop_ids = frozenset({5})
    s = scheduler(tok=tok)
    by_id = job([1], 20)  # 2, 3, 4, then 5: a stop id
    by_string = job([10], 20, stop=("mn",))  # "lmn..." ends before "mn"
    s.submit(by_id)
    s.submit(by_string)
    s.start()
    text, done = by_id.emit.wait()
    assert (text, done.finish_reason, done.usage["completion_tokens"]) == ("cde", "stop", 3)
    text, done = by_string.emit.wait()
    assert (text, done.finish_reason) == ("l", "stop")


def test_cancelled_and_too_long_jobs(scheduler):
    s = scheduler()
    gone = job([1], 50)
    gone.cancelled = True
    too_long = job([1] * 500, 20)
    s.submit(gone)
    s.submit(too_long)
    s.start()
    assert gone.emit.wait()[1].finish_reason == "abort"
    _, ev = too_long.emit.wait()
    assert ev.kind == "error" and "exceed the server's context of 512" in ev.message
    s.stop(timeout=10)
    with pytest.raises(RuntimeError, match="shutting down"):
        s.submit(job([1], 2))


def test_text_stream_holds_back_partial_stop_strings_and_characters():
    class Bytes:  # decodes ids as UTF-8 bytes, like a byte-level BPE
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    ts = TextStream(Bytes(), stop=("END",))
    assert ts.push(list(b"ab")) == ("ab", False)
    assert ts.push(list(b"abE")) == ("", False)  # could become "END"
    assert ts.push(list(b"abEx")) == ("Ex", False)
    euro = list("€".encode())
    assert ts.push(list(b"abEx") + euro[:2]) == ("", False)  # half a character
    assert ts.push(list(b"abEx") + euro) == ("€", False)
    assert ts.push(list(b"abEx") + euro + list(b"ENDzz")) == ("", True)
    assert ts.text == "abEx€"


def test_capacity_bucket_and_limits():
    assert capacity_bucket(100, block_size=8, minimum=16, maximum=4096) == 104  # whole blocks, <= 12.5% over
    assert capacity_bucket(1000, block_size=8, minimum=16, maximum=4096) == 1024
    assert capacity_bucket(3, block_size=8, minimum=16, maximum=4096) == 16  # the minimum
    assert capacity_bucket(5000, block_size=64, minimum=16, maximum=4096) == 5056  # over the maximum: n in blocks
    with pytest.raises(ConfigError, match="batch limits"):
        BatchLimits(max_batch=0, max_context=16)
