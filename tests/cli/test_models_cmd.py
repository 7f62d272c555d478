"""``--model`` (alias ``--gguf``) on the subcommands, ``alaya models inspect``, the memory estimate and its refusal,
on tiny synthetic checkpoints."""

import json

import pytest

pytest.importorskip("safetensors")

from tests.support.hf_checkpoint import HKV, NL, D, H, write_hf  # noqa: E402

from alaya_jax.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "tiny-llama"
    write_hf(d)
    return d


def _run(capsys, argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_models_inspect_json(hf_dir, capsys):
    rc, out, err = _run(capsys, ["models", "inspect", hf_dir, "--json"])
    assert rc == 0, err
    info = json.loads(out)
    assert (info["format"], info["architecture"], info["layers"], info["heads"], info["kv_heads"], info["head_dim"],
            info["context_length"], info["loadable"], info["refused"]) == ("hf", "LlamaForCausalLM", NL, H, HKV, D, 256,
                                                                          True, [])
    assert info["parameters"] > 0 and info["torch_dtype"] == "bfloat16"
    bf, f32 = info["memory_estimate"]["bfloat16"], info["memory_estimate"]["float32"]
    assert bf["context"] == 256 and f32["weights_bytes"] == 2 * bf["weights_bytes"] == 4 * info["parameters"]
    assert f32["kv_bytes"] > bf["kv_bytes"] > 0
    rc, out, _ = _run(capsys, ["--max-context", 64, "models", "inspect", hf_dir, "--json"])
    assert json.loads(out)["memory_estimate"]["bfloat16"]["context"] == 64
    rc, out, _ = _run(capsys, ["models", "inspect", hf_dir])
    assert "architecture: LlamaForCausalLM" in out and "memory (bfloat16, 256 tokens)" in out


def test_models_inspect_lists_refusals(tmp_path, capsys):
    write_hf(tmp_path / "bad", rope_scaling={"rope_type": "yarn", "factor": 4.0}, extra="model.layers.0.extra")
    rc, out, _ = _run(capsys, ["models", "inspect", tmp_path / "bad", "--json"])
    info = json.loads(out)
    assert rc == 0 and not info["loadable"] and "memory_estimate" not in info
    assert any("unsupported rope_scaling type 'yarn'" in r for r in info["refused"])
    rc, _, err = _run(capsys, ["models", "inspect", tmp_path / "nothing"])
    assert rc == 2 and "does not exist" in err


def test_generate_with_model_dir_in_either_position(hf_dir, capsys):
    for argv in (["--model", hf_dir, "generate"], ["generate", "--model", hf_dir], ["--gguf", hf_dir, "generate"]):
        rc, out, err = _run(capsys, argv + ["--prompt", "the thing", "--max-new-tokens", 3, "--json"])
        assert rc == 0, err
        r = json.loads(out)
        assert 1 <= r["new_tokens"] <= 3 and r["prompt_tokens"] > 5  # the Llama-3 chat template's headers
        assert "memory estimate:" in err and "256 tokens" in err and "(float32)" in err


def test_memory_refusal_and_max_context(hf_dir, capsys, monkeypatch):
    rc, _, err = _run(capsys, ["generate", "--model", hf_dir, "--max-context", 8, "--prompt", "the thing",
                               "--max-new-tokens", 3, "--json"])
    assert rc == 2 and "more than --max-context 8" in err and "8 tokens x 1" in err
    import alaya_jax.runtime.memory_estimate as memory

    monkeypatch.setattr(memory, "available_memory", lambda device=None: (1000, "test"))
    rc, _, err = _run(capsys, ["generate", "--model", hf_dir, "--prompt", "x", "--json"])
    assert rc == 2 and "the model will not fit" in err and "0.00 GiB free (test)" in err
    rc, _, err = _run(capsys, ["eval", "--model", hf_dir / "nope", "--text-file", hf_dir / "config.json"])
    assert rc == 2 and "does not exist" in err


def test_estimate_counts_weights_and_kv_exactly():
    import dataclasses

    from alaya_jax.runtime.memory_estimate import estimate_memory
    from models import smollm2_135m

    c = smollm2_135m()
    e = estimate_memory(c, context=8192)
    assert e.weights_bytes == 4 * 134515008  # the parameter count of the GGUF file's tensors
    # K and V [1, 3, 8192, 64] f32 + int4 codes [1, 3, 8192, 32] uint8 + code scale/err [1, 3, 8192] f16
    # + block value means [1, 3, 8192 / 64, 64] f32 (the values' dtype) + rotation signs [3, 64] f32
    # + lengths [1] int32, 30 layers
    assert e.kv_bytes == 30 * (2 * 3 * 8192 * 64 * 4 + 3 * 8192 * 32 + 2 * 3 * 8192 * 2 + 3 * 128 * 64 * 4
                               + 3 * 64 * 4 + 4)
    b = estimate_memory(dataclasses.replace(c, dtype="bfloat16"), context=8192)
    assert b.weights_bytes * 2 == e.weights_bytes and b.kv_bytes < e.kv_bytes
