"""``alaya serve`` through HTTP: batched decode throughput and TTFT from a stored context.

Starts ``python -m alaya_jax serve --random-weights MODEL`` (random weights of the preset,
a byte tokenizer; speed does not depend on the values) on 127.0.0.1 and talks to it with
the standard library only (no openai package needed on the device). Measured:

- ``throughput``: one stream, then ``--streams`` concurrent streams, each a prompt of
  ``--context`` random token ids (no stored prefix) and ``--new-tokens`` greedy tokens,
  streamed. Decode tokens/s of one stream = (chunks - 1) / (last chunk - first chunk);
  aggregate tokens/s of N streams = chunks of all streams inside the window where all N
  stream (the latest first chunk to the earliest last chunk) / the window. A chunk is one
  token here (the byte tokenizer gives every id >= 257 its own text); the server decodes
  ``--decode-chunk`` tokens per device dispatch, so they arrive in bursts of that many and
  ``--new-tokens`` should span several bursts. The whole pattern
  runs once unmeasured first, so that every (batch, capacity) shape is compiled.
- ``ttft``: a ``--context``-token text stored with ``POST /v1/contexts`` (it stays in the
  server's memory tier; on disk too with ``--db-on-disk``), then TTFT of completions whose prompt is that text + a
  ``--tail``-token question (``reuse``) vs another text of the same length + tail
  (``cold``, a full prefill), median of ``--reps`` after one unmeasured run each. TTFT:
  the server's own ``usage.ttft_s`` (arrival to first token) and the client's time to the
  first streamed chunk.

    python -m bench.serve_bench --out $OUT                 # GPU: llama3-8b, 32K, 8 streams, cudnn prefill
    python -m bench.serve_bench --smoke --out /tmp/serve   # CPU: tiny model, tiny context
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from bench import harness

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    def __init__(self, port: int):
        self.port = port

    def request(self, method, path, body=None, timeout=3600):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        c.request(method, path, None if body is None else json.dumps(body), {"Content-Type": "application/json"})
        r = c.getresponse()
        data = r.read()
        c.close()
        out = json.loads(data) if data else None
        if r.status != 200:
            raise RuntimeError(f"{method} {path}: HTTP {r.status}: {out}")
        return out

    def stream(self, body, timeout=3600):
        """(t_sent, [chunk arrival times of non-empty text], usage)."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        body = dict(body, stream=True, stream_options={"include_usage": True})
        t0 = time.perf_counter()
        c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {r.read()[:500]}")
        times, usage = [], None
        while True:
            line = r.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            payload = line[6:]
            if payload == b"[DONE]":
                break
            d = json.loads(payload)
            if "error" in d:
                raise RuntimeError(f"stream error: {d['error']}")
            if d.get("usage"):
                usage = d["usage"]
            elif d["choices"] and d["choices"][0].get("text"):
                times.append(time.perf_counter())
        c.close()
        return t0, times, usage


def start_server(args, port, db):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    env.setdefault("ALAYA_CACHE_DIR", os.path.join(tempfile.gettempdir(), "alaya-bench-cache"))
    if args.smoke:
        env.setdefault("JAX_PLATFORMS", "cpu")
    max_context = args.context + args.tail + args.new_tokens + 64
    cmd = [sys.executable, "-m", "alaya_jax", "--dtype", args.dtype, "serve", "--random-weights", args.model,
           "--port", str(port), "--max-context", str(max_context), "--max-batch", str(args.streams),
           "--prefill-attention", args.prefill_attention, "--prefill-chunk", str(args.prefill_chunk),
           *(["--db", db] if db else []), "--memory-budget", args.memory_budget, "--memory-kind", args.memory_kind,
           "--decode-chunk", str(args.decode_chunk),
           "--max-body-bytes", "64MiB", "--max-tokens-limit", str(max(args.new_tokens, 16)), "--attention",
           args.attention, "--log-level", "warning"]
    log = open(os.path.join(args.out, "server.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    cl = Client(port)
    t0 = time.time()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited {proc.returncode}; see {log.name}")
        try:
            health = cl.request("GET", "/health", timeout=5)
            return proc, cl, health, time.time() - t0
        except (OSError, RuntimeError):
            time.sleep(0.5)
        if time.time() - t0 > args.start_timeout:
            proc.kill()
            raise RuntimeError(f"the server did not start in {args.start_timeout} s; see {log.name}")


def rand_ids(rng, n, vocab):
    return [rng.randrange(257, vocab) for _ in range(n)]  # ids >= 257: never the stop id, one chunk each


def decode_rate(times):
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")


def run_streams(cl, prompts, new_tokens):
    body = lambda p: {"prompt": p, "max_tokens": new_tokens, "temperature": 0}
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as ex:
        res = list(ex.map(lambda p: cl.stream(body(p)), prompts))
    start = max(t[0] for _, t, _ in res)
    end = min(t[-1] for _, t, _ in res)
    inside = sum(1 for _, t, _ in res for x in t if start <= x <= end)
    agg = inside / (end - start) if end > start else float("nan")
    return {"streams": len(prompts), "aggregate_tokens_per_s": agg, "window_s": end - start,
            "tokens": [u["completion_tokens"] for _, _, u in res],
            "per_stream_tokens_per_s": [decode_rate(t) for _, t, _ in res],
            "server_ttft_s": [u["ttft_s"] for _, _, u in res]}


def throughput(cl, args, vocab, rec, log):
    rng = random.Random(1)
    for label in ("warmup", "measured"):
        one = run_streams(cl, [rand_ids(rng, args.context, vocab)], args.new_tokens)
        many = run_streams(cl, [rand_ids(rng, args.context, vocab) for _ in range(args.streams)], args.new_tokens)
        log(f"{label}: 1 stream {one['aggregate_tokens_per_s']:.1f} tok/s; {args.streams} streams "
            f"{many['aggregate_tokens_per_s']:.1f} tok/s aggregate")
    rec["single_stream"] = one
    rec["concurrent"] = many
    rec["aggregate_speedup"] = many["aggregate_tokens_per_s"] / one["aggregate_tokens_per_s"]


def ttft(cl, args, rec, log):
    rng = random.Random(2)
    letters = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,"
    text = lambda n: "".join(rng.choice(letters) for _ in range(n))  # one byte = one token
    ctx = text(args.context)
    t = time.perf_counter()
    made = cl.request("POST", "/v1/contexts", {"prompt": ctx})
    rec["store_context_s"] = time.perf_counter() - t
    rec["stored_tokens"] = made["tokens"]

    def ask(prompt):
        t0, times, usage = cl.stream({"prompt": prompt, "max_tokens": 1, "temperature": 0})
        return {"server_ttft_s": usage["ttft_s"], "client_ttft_s": (times[0] - t0) if times else float("nan"),
                "reused_tokens": usage["reused_tokens"], "source": usage.get("context_source")}

    runs = {"cold": [], "reuse": []}
    for i in range(args.reps + 1):
        runs["cold"].append(ask(text(args.context) + text(args.tail)))
        runs["reuse"].append(ask(ctx + text(args.tail)))
    for k, rs in runs.items():
        rs = rs[1:]  # the first of each compiles its shapes
        rec[f"{k}_server_ttft_s"] = statistics.median(r["server_ttft_s"] for r in rs)
        rec[f"{k}_client_ttft_s"] = statistics.median(r["client_ttft_s"] for r in rs)
        rec[f"{k}_reused_tokens"] = rs[-1]["reused_tokens"]
        rec[f"{k}_source"] = rs[-1]["source"]
        rec[f"{k}_runs"] = runs[k]
    rec["ttft_speedup_server"] = rec["cold_server_ttft_s"] / rec["reuse_server_ttft_s"]
    rec["ttft_speedup_client"] = rec["cold_client_ttft_s"] / rec["reuse_client_ttft_s"]
    log(f"TTFT cold {rec['cold_client_ttft_s']:.3f}s, reuse {rec['reuse_client_ttft_s']:.3f}s "
        f"({rec['ttft_speedup_client']:.1f}x, client side; server side {rec['ttft_speedup_server']:.1f}x; "
        f"reused {rec['reuse_reused_tokens']} tokens from {rec['reuse_source']})")


def markdown(rec) -> str:
    lines = [f"# alaya serve benchmark ({rec['model']}, {rec['context']} tokens, {rec['device']})", "",
             f"jax {rec['versions'].get('jax')}, python {rec['versions']['python']}, commit {rec['commit']}, "
             f"{rec['dtype']}, prefill attention {rec['prefill_attention']} (chunk {rec['prefill_chunk']}), decode "
             f"attention {rec['attention']}, {rec.get('decode_chunk')} decode steps per dispatch, contexts in "
             f"{rec.get('context_db')}, server start {rec['server_start_s']:.1f} s", ""]
    if "concurrent" in rec:
        one, many = rec["single_stream"], rec["concurrent"]
        lines += ["| streams | context each | new tokens | decode tok/s (aggregate) | per stream tok/s |",
                  "|---|---|---|---|---|",
                  f"| 1 | {rec['context']} | {rec['new_tokens']} | {one['aggregate_tokens_per_s']:.1f} | "
                  f"{one['per_stream_tokens_per_s'][0]:.1f} |",
                  f"| {many['streams']} | {rec['context']} | {rec['new_tokens']} | "
                  f"{many['aggregate_tokens_per_s']:.1f} ({rec['aggregate_speedup']:.2f}x) | "
                  f"{statistics.median(many['per_stream_tokens_per_s']):.1f} (median) |", ""]
    if "cold_client_ttft_s" in rec:
        lines += ["| TTFT through HTTP | client (first chunk) | server (usage.ttft_s) | reused tokens |",
                  "|---|---|---|---|",
                  f"| cold (full prefill) | {rec['cold_client_ttft_s']:.4f} s | {rec['cold_server_ttft_s']:.4f} s | "
                  f"{rec['cold_reused_tokens']} |",
                  f"| stored context ({rec['reuse_source']}) | {rec['reuse_client_ttft_s']:.4f} s | "
                  f"{rec['reuse_server_ttft_s']:.4f} s | {rec['reuse_reused_tokens']} |",
                  f"| speed-up | {rec['ttft_speedup_client']:.1f}x | {rec['ttft_speedup_server']:.1f}x | |", ""]
    return "\n".join(lines)


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "starlette", "uvicorn", "flax"):
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception:
            out[name] = None
    return out


def main(argv=None):
    p = harness.parser(__doc__.split("\n\n")[0], "serve_bench",
                       smoke="CPU: tiny model, 256-token context, 4 streams")
    p.add_argument("--model", default="llama3-8b", help="random-weight preset (tiny, smollm2, llama3-8b)")
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--tail", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--attention", default="full")
    p.add_argument("--prefill-attention", default="cudnn")
    p.add_argument("--prefill-chunk", type=int, default=2048)
    p.add_argument("--memory-budget", default="24GiB")
    p.add_argument("--memory-kind", default="device")
    p.add_argument("--db-on-disk", action="store_true",
                   help="start the server with --db (a temporary directory); default: contexts in memory only")
    p.add_argument("--decode-chunk", type=int, default=16, help="the server's decode steps per dispatch")
    p.add_argument("--phases", nargs="+", default=["ttft", "throughput"], choices=["ttft", "throughput"])
    p.add_argument("--start-timeout", type=float, default=900)
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.context, args.streams, args.new_tokens, args.tail = "tiny", 256, 4, 40, 8
        args.decode_chunk = 4
        args.dtype, args.prefill_attention, args.prefill_chunk, args.reps = "float32", "reference", 512, 2
        args.memory_budget = "256MiB"
    os.makedirs(args.out, exist_ok=True)
    from models.random_model import random_config

    vocab = random_config(args.model).vocab_size
    logf = open(os.path.join(args.out, "serve_bench.log"), "a")

    def log(msg):
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    db = tempfile.mkdtemp(prefix="alaya-serve-bench-") if args.db_on_disk else None
    port = _free_port()
    proc, cl, health, start_s = start_server(args, port, db)
    log(f"server up in {start_s:.1f} s on {health.get('device')}")
    rec = {"bench": "serve", "model": args.model, "context": args.context, "streams": args.streams,
           "new_tokens": args.new_tokens, "tail": args.tail, "dtype": args.dtype, "attention": args.attention,
           "prefill_attention": args.prefill_attention, "prefill_chunk": args.prefill_chunk,
           "decode_chunk": args.decode_chunk, "context_db": "disk" if db else "memory",
           # no harness.run_meta() here: this client must not start jax on the server's GPU
           "device": health.get("device"), "versions": _versions(), "commit": harness.commit(),
           "date": harness.utc_now(), "cpu": harness.cpu_name(),
           "server_start_s": start_s, "smoke": args.smoke}
    try:
        if "ttft" in args.phases:
            ttft(cl, args, rec, log)
        if "throughput" in args.phases:
            throughput(cl, args, vocab, rec, log)
        rec["server_health_after"] = cl.request("GET", "/health")
    finally:
        proc.terminate()
        try:
            rec["server_exit_code"] = proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            rec["server_exit_code"] = "killed"
        name = f"serve_{args.model}_{args.context}" + ("_smoke" if args.smoke else "")
        harness.write_results(args.out, name, rec,
                              markdown(rec) if ("concurrent" in rec or "cold_client_ttft_s" in rec) else "no result\n")
        log(f"wrote {name}.json / .md to {args.out}")


if __name__ == "__main__":
    main()
