"""The decode step and a cold prefill, profiled: where the time goes, per op class (issue 19).

Random-weight Llama-3-8B in bf16 (the project's models/ Llama), batch 1, full attention through cuDNN:

  * decode, one token per dispatch (``Engine.decode_step`` + the host sync on the token, as generation
    ran before issue 19), at the first context only;
  * decode in device chunks (``Engine.decode_chunk``: ``--chunk`` tokens per dispatch, sampling and
    stop checks on the device, what ``Engine.generate`` and ``alaya serve`` run), at every context;
    per-token figures = chunk / tokens. Optionally the same under other ``XLA_FLAGS``
    (``--xla-variants``: each in a subprocess, 32K only);
  * DIPR (pallas) one step at ``--dipr-context`` on real-key-proxy stores (bench/decode_step_real), if asked;
  * one cold prefill of ``--prefill-tokens`` through ``Engine.prefill`` (chunk ``--prefill-chunk``,
    capacity as ``alaya serve`` buckets it) and the first token to the host, traced; other chunk sizes
    timed only (``--extra-prefill-chunks``).

Caches: bench/decode_speed.synthetic_caches (random block-clustered keys, built in one jit), capacity as
``alaya serve`` buckets the context (cuDNN reads keys up to each length only). For each: median wall of
untraced calls; a JAX profiler trace (perfetto_trace.json.gz parsed with the standard library) → device
time per op class, kernels per token, device busy vs wall; the optimized HLO (copies, in-place updates,
f32 upcasts, donation = input_output_alias, memory analysis). Kernels are classed from the HLO: a
kernel's ``hlo_op`` (or its name) → the HLO instruction → the Python stack of that instruction.

    python -m bench.profile_step --out $OUT            # H200: bounded by --budget-s
    python -m bench.profile_step --smoke               # CPU: 2-layer SmolLM2-shaped model, XLA attention
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from alaya_jax.attention.config import AttentionConfig, KernelConfig
from alaya_jax.runtime.decode_loop import DecodeState
from alaya_jax.runtime.engine import Engine, capacity_bucket, host_key
from alaya_jax.runtime.sampling import SamplingConfig
from bench import decode_speed, decode_step_real, harness

NAME = "profile_step"
CLASSES = ("weight matmul", "attention", "kv append (+codes)", "rope/norm/elementwise", "sampling", "copy/convert",
           "host<->device memcpy", "other")

# ----------------------------------------------------------------------------- HLO text


_DT_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s4": 0.5, "u4": 0.5, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
             "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "f8e4m3fn": 1, "f8e5m2": 1}
_HLO_DT = {"bfloat16": "bf16", "float16": "f16", "float32": "f32", "uint8": "u8", "int32": "s32", "uint32": "u32",
           "bool": "pred", "int8": "s8", "float64": "f64", "int64": "s64"}
_ARRAY = re.compile(r"\b(pred|s4|u4|s8|u8|bf16|f16|s16|u16|f32|s32|u32|f64|s64|u64|c64|f8e4m3fn|f8e5m2)\[([0-9,]*)\]")


def shape_bytes(shape: str) -> int:
    """Bytes of every array in an HLO shape string (tuples summed)."""
    tot = 0
    for dt, dims in _ARRAY.findall(shape):
        n = 1
        for d in dims.split(","):
            if d:
                n *= int(d)
        tot += int(n * _DT_BYTES[dt])
    return tot


def shape_elems(shape: str) -> int:
    m = _ARRAY.search(shape)
    if not m:
        return 0
    n = 1
    for d in m.group(2).split(","):
        if d:
            n *= int(d)
    return n


@dataclasses.dataclass
class Instr:
    name: str
    shape: str
    opcode: str
    operands: list
    calls: list
    target: str
    frame: int
    kind: str
    comp: str
    line: str
    src: tuple = ()  # (file, line) from metadata source_file/source_line (older HLO printers)


def _split_shape(rest: str) -> tuple[str, str]:
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[: i + 1], rest[i + 1:].lstrip()
    i = rest.find(" ")
    return rest[:i], rest[i + 1:]


class Hlo:
    """The optimized HLO module text: computations, instructions, the stack-frame table."""

    def __init__(self, text: str):
        self.text = text
        self.comps: dict[str, list[Instr]] = {}
        self.by_name: dict[str, Instr] = {}
        self.entry = None
        lines = text.splitlines()
        self.header = lines[0] if lines else ""
        mm = re.match(r"HloModule ([\w.\-]+)", self.header)
        self.module = mm.group(1) if mm else ""
        tables = {}
        cur_table = None
        comp = None
        for ln in lines[1:]:
            if ln in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
                cur_table = ln
                tables[ln] = {}
                continue
            if cur_table and re.match(r"^\d+ ", ln):
                k, v = ln.split(" ", 1)
                tables[cur_table][int(k)] = v
                continue
            if not ln.strip():
                cur_table = None
                continue
            m = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{$", ln)
            if m and not ln.startswith(" "):
                cur_table = None
                comp = m.group(2)
                self.comps[comp] = []
                if m.group(1):
                    self.entry = comp
                continue
            if ln.startswith("}"):
                comp = None
                continue
            if comp is None or " = " not in ln:
                continue
            body = ln.strip()
            if body.startswith("ROOT "):
                body = body[5:]
            name, rest = body.split(" = ", 1)
            name = name.lstrip("%")
            shape, rest = _split_shape(rest)
            m2 = re.match(r"([\w\-]+)\((.*)", rest)
            if not m2:
                continue
            opcode = m2.group(1)
            args_end = _matching(m2.group(2))
            operand_str = m2.group(2)[:args_end]
            attrs = m2.group(2)[args_end:]
            operands = re.findall(r"%([\w.\-]+)", operand_str)
            calls = re.findall(r"(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+)", attrs)
            calls += re.findall(r"branch_computations=\{([^}]*)\}", attrs) and [
                c.strip().lstrip("%") for c in re.findall(r"branch_computations=\{([^}]*)\}", attrs)[0].split(",")]
            tg = re.search(r'custom_call_target="([^"]*)"', attrs)
            fr = re.search(r"stack_frame_id=(\d+)", attrs)
            kd = re.search(r"kind=(k\w+)", attrs)
            sf = re.search(r'source_file="([^"]*)"', attrs)
            sl = re.search(r"source_line=(\d+)", attrs)
            src = (sf.group(1), int(sl.group(1)) if sl else 0) if sf else ()
            ins = Instr(name, shape, opcode, operands, calls, tg.group(1) if tg else "", int(fr.group(1)) if fr else 0,
                        kd.group(1) if kd else "", comp, body, src)
            self.comps[comp].append(ins)
            self.by_name[name] = ins
        self._tables(tables)
        self.by_kernel = {n.replace(".", "_").replace("-", "_"): i for n, i in self.by_name.items()}
        for i in self.by_name.values():  # Pallas/Triton custom calls: the kernel is named after the Pallas kernel
            if i.opcode == "custom-call" and "triton" in i.target.lower():
                for kn in re.findall(r'name\W{1,6}([A-Za-z_]\w*)', i.line):
                    self.by_kernel.setdefault(kn, i)

    def _tables(self, t):
        def q(s):
            m = re.match(r'"(.*)"', s)
            return m.group(1) if m else s

        self.files = {k: q(v) for k, v in t.get("FileNames", {}).items()}
        self.funcs = {k: q(v) for k, v in t.get("FunctionNames", {}).items()}
        self.locs = {}
        for k, v in t.get("FileLocations", {}).items():
            d = dict(re.findall(r"(\w+)=(\d+)", v))
            self.locs[k] = (self.files.get(int(d.get("file_name_id", 0)), "?"),
                            self.funcs.get(int(d.get("function_name_id", 0)), "?"), int(d.get("line", 0)))
        self.frames = {}
        for k, v in t.get("StackFrames", {}).items():
            d = dict(re.findall(r"(\w+)=(\d+)", v))
            self.frames[k] = (int(d.get("file_location_id", 0)), int(d.get("parent_frame_id", 0)))
        # The printer of jaxlib 0.10 shows parent_frame_id as (parent index + 1), 0 = none, so a root
        # frame k shows parent k. Detect that (a frame cannot be its own parent) instead of assuming it.
        self.parent_offset = -1 if any(p == k for k, (_, p) in self.frames.items()) else 0

    def stack(self, frame: int) -> list[tuple[str, str, int]]:
        """[(file, function, line)], innermost first."""
        out, seen = [], set()
        while frame and frame in self.frames and frame not in seen:
            seen.add(frame)
            loc, parent = self.frames[frame]
            out.append(self.locs.get(loc, ("?", "?", 0)))
            frame = parent + self.parent_offset if parent else 0
        return out

    def fused_instrs(self, ins: Instr) -> list[Instr]:
        out, todo, seen = [], list(ins.calls), set()
        while todo:
            c = todo.pop()
            if c in seen or c not in self.comps:
                continue
            seen.add(c)
            for i in self.comps[c]:
                out.append(i)
                todo += i.calls
        return out

    def lookup(self, hlo_op: str | None, kernel: str) -> Instr | None:
        if hlo_op and hlo_op in self.by_name:
            return self.by_name[hlo_op]
        k = kernel.split("(")[0].strip()
        for cand in (k, re.sub(r"__\d+$", "", k), re.sub(r"_\d+$", "", k)):
            if cand in self.by_kernel:
                return self.by_kernel[cand]
        return None


def _matching(s: str) -> int:
    """Index just past the ')' closing an already-opened '('."""
    depth = 1
    for i, ch in enumerate(s):
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(s)


# ----------------------------------------------------------------------------- classification

_HEAVY = ("dot", "convolution", "custom-call", "scatter", "dynamic-update-slice", "sort", "reduce-window",
          "cholesky", "triangular-solve")
_MOVE = {"parameter", "copy", "transpose", "bitcast", "reshape", "convert", "broadcast", "constant", "slice",
         "tuple", "get-tuple-element"}


def class_of_stack(stk, opcode: str) -> str | None:
    for f, fn, _ in stk:
        f = f.replace("\\", "/")
        if "/pallas_kernels/key_codes/" in f or f.endswith("/kv_store.py"):
            return "kv append (+codes)"
        if f.endswith("/sampling.py") or f.endswith("/decode_loop.py"):
            return "sampling"
        if f.endswith("/rope.py") or fn == "RMSNorm.__call__":
            return "rope/norm/elementwise"
        if "/alaya_jax/attention/" in f or "/pallas_kernels/" in f:
            if fn == "fused_causal_attention" and opcode in ("transpose", "copy"):
                return "copy/convert"
            return "attention"
        if f.endswith("/linear.py") or fn == "Llama.logits_from_hidden":
            return "weight matmul"
        if fn in ("Block.__call__",):
            return "weight matmul" if opcode in ("dot", "fusion-gemm", "custom-call") else "rope/norm/elementwise"
    return None


def classify(hlo: Hlo | None, name: str, args: dict) -> tuple[str, str]:
    """(class, where) of one kernel / thunk event."""
    low = name.lower()
    if low.startswith("memcpy") or low.startswith("memset"):
        if "d2d" in low or "dtod" in low:
            return "copy/convert", "device-to-device memcpy"
        return "host<->device memcpy", name
    mod = str(args.get("hlo_module", "") or "")
    if hlo is not None and mod and not mod.startswith(hlo.module):
        # another program of the step (key split, sampling of the first token, cache set-up, ...)
        if any(s in mod for s in ("sample", "split", "threefry", "random", "categorical")):
            return "sampling", f"module {mod}"
        return "other", f"module {mod}"
    ins = hlo.lookup(args.get("hlo_op"), name) if hlo is not None else None
    if ins is None:
        if any(s in low for s in ("sdpa", "fmha", "flash", "attention", "cudnn", "dipr", "refine", "code_scan",
                                  "bounds", "lse_merge")):
            return "attention", "(by kernel name)"
        if any(s in low for s in ("gemv", "gemm", "xmma", "cutlass", "cublas", "matmul", "dot")):
            return "weight matmul", "(by kernel name)"
        if "memcpy" in low or "copy" in low or "transpose" in low:
            return "copy/convert", "(by kernel name)"
        return "other", "(no HLO instruction)"
    sub = hlo.fused_instrs(ins) if ins.calls else []
    ops = {i.opcode for i in sub} | {ins.opcode}
    heavy = [i for i in [ins] + sub if i.opcode in _HEAVY]
    if ins.opcode == "fusion" and ("__triton_gemm" in ins.line or "gemm" in ins.name or "kCustom" == ins.kind
                                   and "dot" in ops):
        opc = "fusion-gemm"
    else:
        opc = ins.opcode
    root = [i for i in sub if i.line.startswith("ROOT")] or [ins]
    if ins.opcode in ("copy", "copy-start", "copy-done", "transpose", "convert") or (
            ins.opcode == "fusion" and sub and {i.opcode for i in sub} <= _MOVE):  # pure data movement, dtype converts
        return "copy/convert", _where(_first_stack(hlo, [root[0], ins] + sub), ins)
    key = heavy[0] if heavy else root[0]
    stk = _first_stack(hlo, [key, ins] + root + sub)
    if ins.opcode == "custom-call" and ("cudnn" in ins.target or "fmha" in ins.target):
        return "attention", _where(stk, ins)
    c = class_of_stack(stk, opc if key is ins else key.opcode)
    if c is None:
        if ops & {"scatter", "dynamic-update-slice"}:
            c = "kv append (+codes)"
        elif ops & {"dot"} or "gemm" in ins.target or "cublas" in ins.target:
            c = "weight matmul"
        elif ops & {"sort", "rng", "rng-bit-generator"}:
            c = "sampling"
        else:
            c = "other"
    return c, _where(stk, ins)


def _first_stack(hlo, cands):
    for i in cands:
        if i.frame:
            st = hlo.stack(i.frame)
            if st:
                return st
        if i.src:  # no StackFrames table: the innermost user frame only, function unknown
            return [(i.src[0], "?", i.src[1])]
    return []


def _where(stk, ins) -> str:
    if not stk:
        ops = ",".join(o for o in ins.operands[:3])
        return f"{ins.opcode}({ops[:70]}) (no stack)"
    f, fn, line = stk[0]
    return f"{os.path.basename(f)}:{line} {fn}"


# ----------------------------------------------------------------------------- HLO summary


def hlo_summary(compiled, cache_leaf_shapes: list) -> dict:
    """Copies, in-place updates, f32 upcasts of weights and donation of one compiled program."""
    text = compiled.as_text()
    h = Hlo(text)
    flat = [i for c in h.comps.values() for i in c]
    fused_comps = set()
    for i in flat:
        if i.opcode == "fusion":
            fused_comps |= set(i.calls)
    top = [i for c, ins in h.comps.items() if c not in fused_comps for i in ins]
    big = 1 << 20
    copies = [i for i in top if i.opcode in ("copy", "copy-start")]
    copy_fusions = []
    for i in top:
        if i.opcode == "fusion":
            ops = {x.opcode for x in h.fused_instrs(i)}
            if ops <= _MOVE and ops & {"copy", "transpose"}:
                copy_fusions.append(i)
    big_copies = [{"name": i.name, "shape": i.shape[:80], "MiB": shape_bytes(i.shape) / 2 ** 20,
                   "where": _where(h.stack(i.frame), i)} for i in copies + copy_fusions if shape_bytes(i.shape) >= big]
    dus = [i for i in flat if i.opcode == "dynamic-update-slice"]
    scat = [i for i in flat if i.opcode == "scatter"]
    # f32 upcasts of bf16 arrays of >= 1M elements (weights are the only such bf16 arrays at decode)
    def _upcasts_in(instrs):
        names = {i.name: i for i in instrs}
        for i in instrs:
            if i.opcode == "convert" and i.shape.startswith("f32") and shape_elems(i.shape) >= big:
                src = names.get(i.operands[0]) if i.operands else None
                if src is not None and src.shape.startswith("bf16"):
                    yield i

    upcasts = []
    for i in top:
        inner = list(_upcasts_in(h.fused_instrs(i))) if i.opcode == "fusion" else []
        if i.opcode == "fusion" and inner:
            upcasts += [{"shape": u.shape[:60], "in": f"{i.name} ({i.opcode}, output {i.shape[:40]})",
                         "operands": i.operands[:4], "where": _where(_first_stack(h, [u, i]), i)} for u in inner]
    for c, ins in h.comps.items():
        if c not in fused_comps:
            upcasts += [{"shape": u.shape[:60], "in": "top level", "operands": u.operands[:2],
                         "where": _where(h.stack(u.frame), u)} for u in _upcasts_in(ins)]
    materialized_f32 = [{"name": i.name, "shape": i.shape[:60], "MiB": shape_bytes(i.shape) / 2 ** 20,
                         "where": _where(h.stack(i.frame), i)}
                        for i in top if i.shape.startswith("f32") and shape_bytes(i.shape) >= 16 * big
                        and i.opcode not in ("parameter", "get-tuple-element", "tuple", "bitcast")]
    aliased = set()
    i0 = h.header.find("input_output_alias={")
    if i0 >= 0:
        seg = h.header[i0 + len("input_output_alias={"):]
        seg = seg[:_matching(seg)]
        aliased = {int(p) for p in re.findall(r"\}:\s*\((\d+),", seg)}
    # Cache parameters: ENTRY parameters whose (dtype, dims) are those of a cache leaf of >= 1 MiB.
    want = {(_HLO_DT.get(np.dtype(dt).name, np.dtype(dt).name), tuple(int(d) for d in shp))
            for shp, dt in cache_leaf_shapes if len(shp) >= 4}  # the blocked fields [B, Hkv, NB, Bk, ...]
    params = {}
    for i in h.comps.get(h.entry, []):
        if i.opcode == "parameter":
            m = _ARRAY.search(i.shape)
            num = re.search(r"parameter\((\d+)\)", i.line)
            if m and num:
                params[int(num.group(1))] = (m.group(1), tuple(int(d) for d in m.group(2).split(",") if d))
    big_cache = [p for p, key in params.items() if key in want]
    launches = [i for i in h.comps.get(h.entry, []) if i.opcode not in (
        "parameter", "get-tuple-element", "tuple", "bitcast", "constant")]
    out = {"instructions": len(flat), "entry_ops_launching": len(launches),
           "entry_ops_by_opcode": dict(collections.Counter(i.opcode for i in launches).most_common()),
           "copies_top_level": len(copies), "copy_fusions_top_level": len(copy_fusions),
           "copies_ge_1MiB": big_copies, "copies_ge_1MiB_total_MiB": sum(c["MiB"] for c in big_copies),
           "dynamic_update_slices": len(dus), "scatters": len(scat),
           "f32_upcasts_of_bf16_ge_1M_elems": upcasts[:50], "f32_upcasts_count": len(upcasts),
           "materialized_f32_ge_16MiB": materialized_f32[:30],
           "cache_params_blocked": len(big_cache), "cache_params_blocked_aliased": len(set(big_cache) & aliased),
           "entry_params": len(params), "params_aliased_total": len(aliased), "module": h.module,
           "stack_parent_offset": h.parent_offset}
    try:
        ma = compiled.memory_analysis()
        out["memory_analysis"] = {k: int(getattr(ma, k)) for k in (
            "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes") if hasattr(ma, k)}
    except Exception as e:  # reported, not hidden
        out["memory_analysis"] = f"unavailable: {type(e).__name__}: {e}"
    return out, h


# ----------------------------------------------------------------------------- traces


def read_trace(d: str) -> list:
    paths = glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
        raise RuntimeError(f"the profiler wrote no perfetto_trace.json.gz under {d}")
    with gzip.open(paths[0], "rt") as f:
        tr = json.load(f)
    return (tr["traceEvents"] if isinstance(tr, dict) else tr), paths[0]


def _union(iv):
    tot, end = 0.0, -1e30
    for s, e in sorted(iv):
        if e <= end:
            continue
        tot += e - max(s, end)
        end = e
    return tot


def analyse_trace(evs, hlo: Hlo | None, module_prefix: str, marker: str, n_steps: int) -> dict:
    """Per-step device time by class from a perfetto trace. Device events: processes named like a GPU
    ("/device:GPU:0 ..."); on the CPU (no device tracks) the XLA thunks of ``module_prefix``."""
    pname = {e["pid"]: e["args"]["name"] for e in evs if e.get("ph") == "M" and e.get("name") == "process_name"}
    xs = [e for e in evs if e.get("ph") == "X"]
    gpu = {p for p, n in pname.items() if "GPU" in n.upper() or "/DEVICE:" in n.upper() and "CPU" not in n.upper()}
    tname = {(e["pid"], e["tid"]): e["args"]["name"] for e in evs
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
    if gpu:
        threads = {k: v for k, v in tname.items() if k[0] in gpu}
        streams = {k for k, v in threads.items() if "stream" in v.lower()}
        # Keep the kernel/memcpy lines (CUDA streams): derived lines ("XLA Ops", "XLA Modules", "Source code",
        # "Steps", ...) repeat the same time under other names.
        dev = [e for e in xs if e["pid"] in gpu and (not streams or (e["pid"], e["tid"]) in streams)]
        source = ("device tracks: " + ", ".join(sorted({pname[p] for p in gpu})) + "; lines kept: "
                  + ", ".join(sorted({threads[k] for k in streams})[:8]) + "; all lines: "
                  + ", ".join(sorted(set(threads.values()))[:20]))
    else:
        dev = [e for e in xs if str(e.get("args", {}).get("hlo_module", "")).startswith(module_prefix)
               and not e["name"].startswith("end: ")]
        source = f"CPU: XLA thunk events of hlo_module {module_prefix}* (no device tracks)"
    marks = sorted([(e["ts"], e["ts"] + e["dur"]) for e in xs if e["name"] == marker])
    by_class = collections.defaultdict(float)
    by_kernel = collections.defaultdict(lambda: [0, 0.0, "", ""])
    arg_keys = collections.Counter()
    for e in dev:
        a = e.get("args", {}) or {}
        arg_keys.update(a.keys())
        c, where = classify(hlo, e["name"], a)
        by_class[c] += e["dur"]
        k = by_kernel[e["name"][:90]]
        k[0] += 1
        k[1] += e["dur"]
        k[2], k[3] = c, where
    busy = _union([(e["ts"], e["ts"] + e["dur"]) for e in dev])
    per = max(n_steps, 1)
    windows = []
    for s, t in marks:
        inside = [(e["ts"], e["ts"] + e["dur"]) for e in dev if e["ts"] >= s and e["ts"] < t]
        if inside:
            windows.append({"window_us": t - s, "device_span_us": max(b for _, b in inside) - min(a for a, _ in inside),
                            "device_busy_us": _union(inside), "kernels": len(inside)})
    tot = sum(by_class.values())
    kernels = sorted(({"name": k, "count_per_step": v[0] / per, "us_per_step": v[1] / per, "class": v[2],
                       "where": v[3]} for k, v in by_kernel.items()), key=lambda r: -r["us_per_step"])
    return {"source": source, "steps": n_steps, "device_events": len(dev), "kernels_per_step": len(dev) / per,
            "device_busy_ms_per_step": busy / per / 1e3, "device_sum_ms_per_step": tot / per / 1e3,
            "class_ms_per_step": {c: by_class.get(c, 0.0) / per / 1e3 for c in CLASSES},
            "windows": windows, "top_kernels": kernels[:40], "device_event_arg_keys": dict(arg_keys),
            "sample_device_events": [{k: e.get(k) for k in ("name", "dur", "args")} for e in dev[:8]]}


def traced(fn, n: int, marker: str, tmp: str):
    d = tempfile.mkdtemp(dir=tmp)
    with jax.profiler.trace(d, create_perfetto_trace=True):
        for _ in range(n):
            with jax.profiler.TraceAnnotation(marker):
                fn()
    return read_trace(d)


# ----------------------------------------------------------------------------- runs


class Capture:
    """Wraps a jitted function: lowers its first call with the real arguments, before the call donates
    them. The call then compiles that same lowering once, and ``compiled()`` is a cache hit (checked on
    the CPU; ``ShapeDtypeStruct``s with a sharding miss the cache and recompile)."""

    def __init__(self, f, marker: str | None = None, *, lower: bool = True):
        self.f, self.marker, self.lowered, self.calls, self.lower = f, marker, None, 0, lower
        self.args = None

    def __call__(self, *a, **k):
        if self.lowered is None and self.lower:
            self.lowered = self.f.lower(*a, **k)
            self.args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if isinstance(x, jax.Array)
                                     else x, a)
        self.calls += 1
        if self.marker:
            with jax.profiler.TraceAnnotation(self.marker):
                return self.f(*a, **k)
        return self.f(*a, **k)

    def compiled(self):
        return self.lowered.compile()


def roofline_bytes(state, caches, context: int) -> dict:
    w = sum(x.nbytes for x in jax.tree.leaves(state))
    c0 = caches[0]
    kv = len(caches) * 2 * c0.batch * c0.num_kv_heads * context * c0.head_dim * c0.keys.dtype.itemsize
    return {"weight_bytes": int(w), "kv_bytes_at_context": int(kv)}


def step_timing(step, steps: int, *, per: int = 1) -> dict:
    """Median / p90 / min wall of ``step()`` over ``steps`` calls after two, per token (``per`` tokens a call)."""
    ts = []
    for _ in range(steps + 2):
        t = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t)
    s = np.array(ts[2:]) / per
    return {"token_ms_median": 1e3 * float(np.median(s)), "token_ms_p90": 1e3 * float(np.percentile(s, 90)),
            "token_ms_min": 1e3 * float(s.min()), "calls_timed": int(s.size)}


def cudnn_check(attn: str, *, seed: int = 0) -> dict:
    """The dense backend the profile times (``attn``) against the reference (``causal_attention`` in f32
    on the same bf16 values) in the same run, on Llama-3-8B's heads (32 query, 8 KV, D 128), bf16, a ragged
    batch (one row with no prefix): a decode step and a prefill chunk, with zeros and with NaN past the
    lengths. → max |error| of each."""
    from alaya_jax.attention.dense import DENSE_IMPLEMENTATIONS, causal_attention
    from alaya_jax.store import kv_store

    rng = np.random.default_rng(seed)
    prior, cap, hq, hkv, d = np.array([0, 77, 1500]), 2048, 32, 8, 128
    out = {}
    for t in (1, 256):
        for poison in (False, True):
            n = np.minimum(np.array([t, max(t // 3, 1), t]), t)
            base = rng.normal(size=(3, cap, hkv, d)).astype(np.float32)
            st = kv_store.from_dense(jnp.asarray(base, jnp.bfloat16), jnp.asarray(base[..., ::-1], jnp.bfloat16),
                                     jnp.asarray(prior, jnp.int32), block_size=64, capacity=cap)
            if poison:
                bad = ~np.asarray(kv_store.positions_valid(st)).reshape(3, 1, -1, 64)[..., None]
                st = st.replace(keys=jnp.where(bad, jnp.nan, st.keys).astype(jnp.bfloat16),
                                values=jnp.where(bad, jnp.nan, st.values).astype(jnp.bfloat16))
            k = jnp.asarray(rng.normal(size=(3, t, hkv, d)), jnp.bfloat16)
            v = jnp.asarray(rng.normal(size=(3, t, hkv, d)), jnp.bfloat16)
            st = kv_store.append(st, k, v, jnp.asarray(n, jnp.int32))
            q = jnp.asarray(rng.normal(size=(3, t, hq, d)) * 2.0, jnp.bfloat16)
            pos = jnp.asarray(prior[:, None] + np.arange(t)[None, :], jnp.int32)
            got = np.asarray(jax.jit(DENSE_IMPLEMENTATIONS[attn])(q, st, pos), np.float32)
            f32 = st.replace(keys=st.keys.astype(jnp.float32), values=st.values.astype(jnp.float32))
            want = np.asarray(causal_attention(q.astype(jnp.float32), f32, pos))  # the reference in f32
            err = max(float(np.max(np.abs(got[j, :n[j]] - want[j, :n[j]]))) for j in range(3))
            out[f"{'decode' if t == 1 else f'chunk{t}'}{'_nan_padding' if poison else ''}_max_abs_err"] = err
    return out


def serve_capacity(context: int, *, block_size: int, limit: int, extra: int = 96) -> int:
    """The capacity ``alaya serve`` gives a request of ``context`` prompt tokens (+ ``extra`` new ones)."""
    return capacity_bucket(context + extra, block_size=block_size, minimum=256, maximum=limit)


def _caches(engine, cfg, context, cap):
    t0 = time.perf_counter()
    caches = decode_speed.synthetic_caches(engine, 1, context, cap, centre_scale=1.0, noise=0.03)
    jax.block_until_ready(caches)
    return caches, time.perf_counter() - t0


def _hlo(rec, cap_fn, caches, files, name, args):
    t0 = time.perf_counter()
    comp = cap_fn.compiled()
    rec["lower_compile_again_s"] = time.perf_counter() - t0
    rec["hlo"], hlo = hlo_summary(comp, [(x.shape, x.dtype) for x in jax.tree.leaves(caches)])
    if name:
        _save_text(files, name, comp.as_text(), args)
    return hlo


def decode_single(engine, cfg, context, args, log, tmp, files) -> dict:
    """One token per dispatch: ``Engine.decode_step`` and the host sync on the token (generation before
    issue 19: the host decided after every token)."""
    att = AttentionConfig(method="full", kernel=KernelConfig(prefill_attention=args.attn))
    cap = serve_capacity(context, block_size=engine.block_size, limit=cfg.max_position_embeddings)
    caches, build_s = _caches(engine, cfg, context, cap)
    rec = {"scenario": f"decode 1 token/dispatch ({args.attn}) {context // 1024}K", "context": context,
           "capacity": cap, "caches_build_s": build_s, "tokens_per_call": 1,
           "step": "jax.random.split, Engine.decode_step, np.asarray(token)"}
    rec.update(roofline_bytes(engine._state, caches, context))
    cap_fn = Capture(engine._decode)
    engine._decode = cap_fn
    st = {"caches": caches, "token": jnp.zeros((1,), jnp.int32), "key": jax.random.PRNGKey(0)}
    samp = SamplingConfig()

    def step():
        st["key"], sub = jax.random.split(st["key"])
        st["token"], _, st["caches"], _ = engine.decode_step(st["caches"], st["token"], key=sub, sampling=samp,
                                                             attention=att)
        np.asarray(st["token"])

    try:
        t0 = time.perf_counter()
        step()
        rec["first_call_s"] = time.perf_counter() - t0
        hlo = _hlo(rec, cap_fn, st["caches"], files, None, args)
        rec.update(step_timing(step, args.steps))
        log(f"{rec['scenario']}: {rec['token_ms_median']:.2f} ms/token (first {rec['first_call_s']:.1f} s)")
        evs, _ = traced(step, args.trace_steps, "alaya_step", tmp)
        rec["trace"] = analyse_trace(evs, hlo, "jit_decode", "alaya_step", args.trace_steps)
    finally:
        engine._decode = cap_fn.f
    return rec


def decode_chunked(engine, cfg, context, args, log, tmp, files, *, save: bool = True) -> dict:
    """``--chunk`` tokens per dispatch through ``Engine.decode_chunk`` (greedy, a key chain per row and
    no stop id hit: what the server runs for one stream), then the host reads the chunk's tokens."""
    att = AttentionConfig(method="full", kernel=KernelConfig(prefill_attention=args.attn))
    cap = serve_capacity(context, block_size=engine.block_size, limit=cfg.max_position_embeddings)
    caches, build_s = _caches(engine, cfg, context, cap)
    n = args.chunk
    flags = os.environ.get("XLA_FLAGS", "")
    rec = {"scenario": f"decode {n} tokens/dispatch ({args.attn}) {context // 1024}K"
                       + (f" [{args.label}]" if args.label else ""), "context": context, "capacity": cap,
           "caches_build_s": build_s, "tokens_per_call": n, "xla_flags": flags,
           "step": "Engine.decode_chunk (lax.while_loop: model step, arg-max, stop/limit checks), np.asarray(tokens)"}
    rec.update(roofline_bytes(engine._state, caches, context))
    cap_fn = Capture(engine._chunk)
    engine._chunk = cap_fn
    knobs = dict(temperature=np.zeros(1, np.float32), top_p=np.ones(1, np.float32), sampled=False, nucleus=False)
    st = {"caches": caches, "state": DecodeState(token=np.zeros(1, np.int32), keys=host_key(0)[None],
                                                 done=np.zeros(1, bool), left=np.full(1, 1 << 30, np.int32),
                                                 stopped=np.zeros(1, bool))}

    def chunk():
        toks, _, st["state"], st["caches"] = engine.decode_chunk(st["caches"], st["state"], steps=n, attention=att,
                                                                 **knobs)
        np.asarray(toks)

    try:
        t0 = time.perf_counter()
        chunk()
        rec["first_call_s"] = time.perf_counter() - t0
        hlo = _hlo(rec, cap_fn, st["caches"], files, f"hlo_decode_chunk_{context}.txt.gz" if save else None, args)
        rec.update(step_timing(chunk, args.steps, per=n))
        log(f"{rec['scenario']}: {rec['token_ms_median']:.2f} ms/token (first {rec['first_call_s']:.1f} s)")
        evs, path = traced(chunk, 2, "alaya_chunk", tmp)
        rec["trace"] = analyse_trace(evs, hlo, "jit_chunk", "alaya_chunk", 2 * n)
        if save:
            _save_file(files, f"trace_decode_chunk_{context}.json.gz", path, args, only_first=True)
    finally:
        engine._chunk = cap_fn.f
    return rec


def decode_dipr(model, cfg, context, args, log, tmp, files) -> dict:
    nd = min(args.dipr_sources, cfg.num_layers)
    cap = context + 128
    t0 = time.perf_counter()
    cfg_n = dataclasses.replace(cfg, num_layers=nd)
    stores_n, qs_n = decode_step_real.proxy_stores(cfg_n, 1, context, cap)
    stores = tuple(jax.tree.map(jnp.copy, stores_n[i % nd]) for i in range(cfg.num_layers))
    qs = qs_n[jnp.arange(cfg.num_layers) % nd]
    del stores_n
    jax.block_until_ready((stores, qs))
    beta = float(args.beta64 * (cfg.head_dim / 64) ** 0.5)
    att = AttentionConfig(method="dipr", kernel=KernelConfig(implementation="pallas"))
    f, state = decode_step_real.make_step(model, att)
    rec = {"scenario": f"decode dipr (pallas) {context // 1024}K, 1 token/dispatch", "context": context,
           "capacity": cap, "beta": beta, "proxy_sources": nd, "caches_build_s": time.perf_counter() - t0,
           "tokens_per_call": 1,
           "step": "bench/decode_step_real.make_step (model step, proxy real queries, argmax), np.asarray(token)"}
    rec.update(roofline_bytes(state, stores, context))
    cap_fn = Capture(f)
    st = {"caches": stores, "token": jnp.zeros((1,), jnp.int32), "aux": None}
    b = jnp.float32(beta)

    def step():
        st["token"], st["caches"], st["aux"] = cap_fn(state, st["caches"], st["token"], qs, b)
        np.asarray(st["token"])

    t0 = time.perf_counter()
    step()
    rec["first_call_s"] = time.perf_counter() - t0
    hlo = _hlo(rec, cap_fn, st["caches"], files, None, args)
    rec.update(step_timing(step, args.steps))
    a = jax.device_get(st["aux"])
    ln = float(np.asarray(st["caches"][0].lengths).mean())
    rec["candidate_fraction"] = float(np.mean([np.asarray(x["candidates"]).mean() for x in a])) / ln
    log(f"{rec['scenario']}: {rec['token_ms_median']:.2f} ms/token, candidates {rec['candidate_fraction']:.2%}")
    evs, _ = traced(step, args.trace_steps, "alaya_step", tmp)
    rec["trace"] = analyse_trace(evs, hlo, "jit_step", "alaya_step", args.trace_steps)
    return rec


def prefill(engine, cfg, n_tokens, chunk, args, log, tmp, files, *, trace: bool) -> dict:
    engine.prefill_chunk = chunk
    cap = serve_capacity(n_tokens, block_size=engine.block_size, limit=cfg.max_position_embeddings, extra=64)
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, size=n_tokens).tolist()
    cap_fn = Capture(engine._forward, marker="alaya_chunk", lower=trace)
    engine._forward = cap_fn
    rec = {"scenario": f"prefill {n_tokens // 1024}K cold, chunk {chunk}", "tokens": n_tokens, "chunk": chunk,
           "capacity": cap, "prefill_attention": engine._prefill_cfg.kernel.prefill_attention,
           "step": "new_caches + Engine.prefill + first token (Engine.first_tokens) to the host, as the server"}

    def once():
        caches = engine.new_caches(batch=1, capacity=cap)
        caches, logits, _ = engine.prefill(caches, [prompt])
        first, _ = engine.first_tokens(logits, host_key(0)[None], np.zeros(1, np.float32), np.ones(1, np.float32),
                                       [1], sampled=False, nucleus=False)
        int(np.asarray(first)[0])
        return caches

    try:
        t0 = time.perf_counter()
        c = once()
        rec["first_call_s"] = time.perf_counter() - t0
        del c
        ts = []
        for _ in range(args.prefill_reps):
            t0 = time.perf_counter()
            c = once()
            ts.append(time.perf_counter() - t0)
            del c
        rec["wall_s_median"] = float(np.median(ts))
        rec["wall_s_all"] = ts
        rec["chunks"] = -(-n_tokens // chunk)
        nparams = sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(engine._state)
                      if "embed" not in jax.tree_util.keystr(p))  # matmul weights: all but the embedding table
        rec["matmul_flop"] = 2.0 * nparams * n_tokens
        L, H, D = cfg.num_layers, cfg.num_heads, cfg.head_dim
        rec["attention_flop_causal"] = 4.0 * L * H * D * n_tokens * n_tokens / 2
        # as run: each chunk over the prefix before it (all of it) and over itself (causal, half)
        starts = range(0, n_tokens, chunk)
        rec["attention_flop_as_run"] = sum(4.0 * L * H * D * min(chunk, n_tokens - i)
                                           * (i + min(chunk, n_tokens - i) / 2) for i in starts)
        log(f"{rec['scenario']}: {rec['wall_s_median']:.3f} s (first {rec['first_call_s']:.1f} s)")
        if trace:
            hlo = _hlo(rec, cap_fn, cap_fn.args[3], files, f"hlo_prefill_{n_tokens}_chunk{chunk}.txt.gz", args)
            evs, path = traced(once, 1, "alaya_prefill", tmp)
            rec["trace"] = analyse_trace(evs, hlo, "jit_forward", "alaya_prefill", rec["chunks"])
            rec["trace"]["per"] = "chunk"
            _save_file(files, f"trace_prefill_{n_tokens}.json.gz", path, args, only_first=True)
    finally:
        engine._forward = cap_fn.f
    return rec


def _save_text(files, name, text, args):
    if not args.save_hlo or name in files or len(files) >= 8:
        return
    p = os.path.join(args.out, name)
    with gzip.open(p + ".tmp", "wt") as f:
        f.write(text)
    os.replace(p + ".tmp", p)
    files.append(name)


def _save_file(files, name, path, args, *, only_first):
    if not args.save_traces or os.path.getsize(path) > 15 * 2 ** 20 or len(files) >= 8:
        return
    shutil.copyfile(path, os.path.join(args.out, name))
    files.append(name)


def matmul_tflops(n: int) -> float:
    a = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(lambda x: x @ x)
    ts = [harness.timed(f, (a,), 5)[0] for _ in range(2)]
    return 2 * n ** 3 / min(ts) / 1e12


# ----------------------------------------------------------------------------- report


def markdown(res) -> str:
    m = res["meta"]
    out = [f"# Decode step and cold prefill profiled, random-weight {m['model']} bf16, B=1", "",
           f"{m['device']}, jax {m['jax']}, jaxlib {m.get('jaxlib')}, flax {m.get('flax')}, triton {m.get('triton')}, "
           f"{m['date']}, commit {m['commit']}. XLA_FLAGS `{m['xla_flags']}` (rows marked [..] ran under other flags, "
           f"in a process of their own). Copy bandwidth {m.get('copy_GBps', 0):.0f} GB/s, bf16 matmul "
           f"{m.get('matmul_tflops', 0):.0f} TFLOP/s (both measured in this run).", "",
           f"Dense attention backend checked against the reference in this run (bf16, max |error|; NaN = "
           f"broken): {m.get('dense_check')}.", "",
           "Wall = median over untraced calls, per token (a call decodes `tokens/call` tokens, then the host reads "
           "them). Device columns from a profiler trace, per token (prefill: per whole prefill). busy = union of "
           "device kernel intervals.", ""]
    rows = [r for r in res["runs"] if "error" not in r and "skipped" not in r]
    hdr = ("| scenario | tokens/call | wall ms | roofline ms | wall/roofline | busy ms | busy/wall | gap ms | "
           "kernels | " + " | ".join(CLASSES) + " |")
    out += [hdr, "|" + "---|" * (9 + len(CLASSES))]
    for r in rows:
        t = r.get("trace")
        wall = 1e3 * r["wall_s_median"] if "wall_s_median" in r else r.get("token_ms_median")
        if wall is None:
            continue
        roof = r.get("roofline_ms")
        rr = "" if roof is None else f"{wall / roof:.2f}"
        if not t:
            out.append(f"| {r['scenario']} | {r.get('tokens_per_call', '')} | {wall:.2f} | "
                       f"{'' if roof is None else format(roof, '.2f')} | {rr} |" + " |" * (4 + len(CLASSES)))
            continue
        k = t["steps"] if t.get("per") == "chunk" else 1  # prefill: totals of the whole prefill
        busy = t["device_busy_ms_per_step"] * k
        cls = " | ".join(f"{t['class_ms_per_step'][c] * k:.2f}" for c in CLASSES)
        out.append(f"| {r['scenario']} | {r.get('tokens_per_call', '')} | {wall:.2f} | "
                   f"{'' if roof is None else format(roof, '.2f')} | {rr} | {busy:.2f} | {busy / wall:.0%} | "
                   f"{wall - busy:.2f} | {t['kernels_per_step'] * k:.0f} | {cls} |")
    out.append("")
    out.append("roofline = (weights + K/V at the context) / copy bandwidth; gap = wall − busy (launch gaps, host "
               "work, host↔device round trip).")
    for r in rows:
        if "wall_s_median" in r:
            mm = r["matmul_flop"] / (r["wall_s_median"] * m["matmul_tflops"] * 1e12)
            out.append(f"- {r['scenario']}: capacity {r['capacity']}, {r['chunks']} chunks of {r['chunk']}, "
                       f"{r['prefill_attention']} attention; wall {r['wall_s_median']:.3f} s = {mm:.0%} of the "
                       f"measured bf16 matmul rate on the matrix FLOPs ({r['matmul_flop']:.2e}); causal attention adds "
                       f"{r['attention_flop_causal']:.2e} FLOP, {r['attention_flop_as_run']:.2e} as run"
                       + (f"; first call {r['first_call_s']:.1f} s (compile)" if "first_call_s" in r else ""))
        elif "token_ms_median" in r:
            out.append(f"- {r['scenario']}: capacity {r['capacity']}, first call {r['first_call_s']:.1f} s, "
                       f"p90 {r['token_ms_p90']:.2f} ms/token, caches built in {r['caches_build_s']:.1f} s"
                       + (f", XLA_FLAGS `{r['xla_flags']}`" if r.get("xla_flags") else "")
                       + (f", DIPR β {r['beta']:.1f}, candidates {r['candidate_fraction']:.2%}"
                          if "beta" in r else ""))
    for r in res["runs"]:
        if "error" in r or "skipped" in r:
            out.append(f"\n- {r.get('scenario')}: {r.get('error') or r.get('skipped')}")
    out += ["", "## HLO of each program", "",
            "| scenario | instrs | entry ops | copies (top) | copy fusions | copies ≥1MiB (MiB) | DUS | scatter | "
            "f32 upcasts ≥1M | cache arrays donated (aliased) | temp MiB |", "|" + "---|" * 11]
    for r in rows:
        h = r.get("hlo")
        if not h:
            continue
        ma = h.get("memory_analysis")
        temp = ma.get("temp_size_in_bytes", 0) / 2 ** 20 if isinstance(ma, dict) else float("nan")
        out.append(f"| {r['scenario']} | {h['instructions']} | {h['entry_ops_launching']} | {h['copies_top_level']} | "
                   f"{h['copy_fusions_top_level']} | {len(h['copies_ge_1MiB'])} "
                   f"({h['copies_ge_1MiB_total_MiB']:.0f}) | "
                   f"{h['dynamic_update_slices']} | {h['scatters']} | {h['f32_upcasts_count']} | "
                   f"{h['cache_params_blocked_aliased']}/{h['cache_params_blocked']} | {temp:.0f} |")
    for r in rows:
        h = r.get("hlo") or {}
        if h.get("copies_ge_1MiB"):
            agg = collections.Counter((c["where"], c["shape"].split("{")[0]) for c in h["copies_ge_1MiB"])
            out += ["", f"Copies ≥ 1 MiB in {r['scenario']}: " + "; ".join(
                f"{n}× {s} at {w}" for (w, s), n in agg.most_common(8))]
    for r in rows:
        t = r.get("trace")
        if not t:
            continue
        k = t["steps"] if t.get("per") == "chunk" else 1
        out += ["", f"## Top kernels: {r['scenario']} ({'per prefill' if k > 1 else 'per token'})", "",
                "| kernel | count | µs | class | where |", "|---|---|---|---|---|"]
        for kk in t["top_kernels"][:12]:
            out.append(f"| `{kk['name'][:70]}` | {kk['count_per_step'] * k:.1f} | {kk['us_per_step'] * k:.1f} | "
                       f"{kk['class']} | {kk['where']} |")
    return "\n".join(out) + "\n"


def _variant(args, flags: str, label: str, context: int, log) -> list:
    """The chunked decode at ``context`` in a process of its own under ``XLA_FLAGS=flags`` (XLA reads its
    flags once per process). Returns its runs (an error row if it failed or ran out of time)."""
    out = tempfile.mkdtemp(prefix="p19v-")
    cmd = [sys.executable, "-m", "bench.profile_step", "--only-chunk", str(context), "--label", label,
           "--chunk", str(args.chunk), "--steps", str(args.steps), "--out", out, "--no-save-hlo", "--no-save-traces"]
    if args.smoke:
        cmd.append("--smoke")
    # The parent holds its share of the GPU's memory: the child allocates as it goes, within the rest.
    env = dict(os.environ, XLA_FLAGS=flags, OUT=out, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.variant_timeout_s,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        with open(os.path.join(out, f"{NAME}.json")) as f:
            runs = json.load(f)["runs"]
        if p.returncode:
            runs.append({"scenario": label, "error": f"exit {p.returncode}: {p.stderr[-400:]}"})
        return runs
    except (subprocess.TimeoutExpired, OSError, ValueError, KeyError) as e:
        log(f"variant {label} failed: {type(e).__name__}: {str(e)[-300:]}")
        return [{"scenario": f"decode chunk {context} [{label}]", "error": f"{type(e).__name__}: {str(e)[-300:]}"}]
    finally:
        shutil.rmtree(out, ignore_errors=True)


#: XLA_FLAGS tried by ``--xla-variants`` (label → flags): command buffers (CUDA graphs) off, and on for
#: the while loop and conditionals too (the default leaves them out).
XLA_VARIANTS = {
    "no command buffers": "--xla_gpu_enable_command_buffer=",
    "command buffers incl. while": "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,"
                                   "CONDITIONAL",
}


def main(argv=None):
    ap = harness.parser(__doc__.split("\n")[0], NAME, smoke="CPU: 2-layer SmolLM2-shaped model, XLA attention, small")
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--chunk", type=int, default=16, help="tokens per dispatch of the chunked decode (alaya serve's)")
    ap.add_argument("--single-step-context", type=int, default=32768, help="one-token decode here (0: none)")
    ap.add_argument("--dipr-context", type=int, default=0, help="DIPR one-token decode here (0: none)")
    ap.add_argument("--dipr-sources", type=int, default=4, help="distinct real-key proxies cycled over the layers")
    ap.add_argument("--beta64", type=float, default=24.0, help="DIPR β at d=64 (scaled to the model's D)")
    ap.add_argument("--prefill-tokens", type=int, default=32768)
    ap.add_argument("--prefill-chunk", type=int, default=2048, help="bench/serve_bench.py's default")
    ap.add_argument("--extra-prefill-chunks", type=int, nargs="*", default=[4096, 8192],
                    help="timed only, if time is left")
    ap.add_argument("--prefill-reps", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12, help="timed calls per decode scenario")
    ap.add_argument("--trace-steps", type=int, default=4)
    ap.add_argument("--xla-variants", nargs="*", default=[], choices=sorted(XLA_VARIANTS),
                    help="also run the chunked decode at the first context under these XLA_FLAGS")
    ap.add_argument("--variant-timeout-s", type=float, default=70.0)
    ap.add_argument("--budget-s", type=float, default=215.0, help="parts that would not fit are skipped (reported)")
    ap.add_argument("--only-chunk", type=int, default=0, help=argparse_hidden())
    ap.add_argument("--label", default="", help=argparse_hidden())
    ap.add_argument("--no-save-hlo", dest="save_hlo", action="store_false")
    ap.add_argument("--no-save-traces", dest="save_traces", action="store_false")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    args.model, args.attn = "llama3-8b", "cudnn"
    if args.smoke:
        args.model, args.attn = "smollm2-2l", "xla"
        args.contexts, args.prefill_tokens, args.prefill_chunk = [1024, 2048], 1024, 256
        args.single_step_context = args.single_step_context and 1024
        args.dipr_context = args.dipr_context and 1024
        args.extra_prefill_chunks, args.steps, args.trace_steps, args.prefill_reps = [512], 3, 2, 1
        args.chunk = min(args.chunk, 4)
    if args.only_chunk:
        args.contexts, args.single_step_context, args.dipr_context, args.prefill_tokens = [args.only_chunk], 0, 0, 0
        args.extra_prefill_chunks, args.xla_variants = [], []
    os.makedirs(args.out, exist_ok=True)
    logf = open(os.path.join(args.out, f"{NAME}.log"), "a")

    def log(msg):
        line = f"[{time.perf_counter() - t_start:7.1f}s] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    def left():
        return args.budget_s - (time.perf_counter() - t_start)

    import flax

    meta = harness.run_meta(model=args.model, batch=1, smoke=args.smoke, flax=flax.__version__)
    res = {"meta": meta, "args": vars(args), "runs": []}
    files = [f"{NAME}.json", f"{NAME}.md", f"{NAME}.log"]
    tmp = tempfile.mkdtemp(prefix="p19-")
    t0 = time.perf_counter()
    meta["copy_GBps"] = harness.measure_copy_bandwidth(nbytes=(64 << 20) if args.smoke else (4 << 30)) / 1e9
    meta["matmul_tflops"] = matmul_tflops(512 if args.smoke else 8192)
    log(f"{meta['device']}: copy {meta['copy_GBps']:.0f} GB/s, bf16 matmul {meta['matmul_tflops']:.0f} TFLOP/s "
        f"({time.perf_counter() - t0:.1f} s)")
    try:
        meta["dense_check"] = cudnn_check(args.attn)
        log(f"{args.attn} vs reference attention: {meta['dense_check']}")
    except Exception as e:  # reported, never hidden: the timings below then use a backend that failed its check
        meta["dense_check"] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
        log(f"{args.attn} check failed: {e}\n{traceback.format_exc()}")
    cfg, model = decode_step_real.build_model(args.model, max(args.contexts + [args.dipr_context,
                                                                               args.prefill_tokens]))
    engine = Engine(model, block_size=64, prefill_chunk=args.prefill_chunk, prefill_attention=args.attn,
                    max_chunk=args.chunk)
    jax.block_until_ready(engine._state)
    log(f"model {args.model} built ({time.perf_counter() - t_start:.1f} s since start)")

    def attempt(name, need_s, fn):
        if left() < need_s:
            res["runs"].append({"scenario": name, "skipped": f"time budget: {left():.0f} s left, ~{need_s} s needed"})
            log(f"skip {name}: {left():.0f} s left")
            return
        try:
            r = fn()
            if "weight_bytes" in r:
                r["roofline_ms"] = 1e3 * (r["weight_bytes"] + r["kv_bytes_at_context"]) / (meta["copy_GBps"] * 1e9)
            res["runs"].append(r)
        except Exception as e:  # reported in the results, with its traceback in the log
            res["runs"].append({"scenario": name, "error": f"{type(e).__name__}: {str(e)[:500]}"})
            log(f"{name} failed: {type(e).__name__}: {e}\n{traceback.format_exc()}")
        _write(res, args)

    smoke = args.smoke
    for i, ctx in enumerate(args.contexts):
        attempt(f"decode chunk {ctx}", 5 if smoke else 30,
                lambda ctx=ctx, i=i: decode_chunked(engine, cfg, ctx, args, log, tmp, files, save=i == 0))
    if args.prefill_tokens:
        attempt(f"prefill {args.prefill_tokens}", 5 if smoke else 40,
                lambda: prefill(engine, cfg, args.prefill_tokens, args.prefill_chunk, args, log, tmp, files,
                                trace=True))
    for label in args.xla_variants:
        need = 5 if smoke else min(args.variant_timeout_s, 55)
        if left() < need:
            res["runs"].append({"scenario": f"decode chunk [{label}]", "skipped": f"time budget: {left():.0f} s left"})
            continue
        log(f"variant {label}: XLA_FLAGS={XLA_VARIANTS[label]}")
        res["runs"] += _variant(args, XLA_VARIANTS[label], label, args.contexts[0], log)
        _write(res, args)
    if args.single_step_context:
        attempt(f"decode single {args.single_step_context}", 5 if smoke else 30,
                lambda: decode_single(engine, cfg, args.single_step_context, args, log, tmp, files))
    if args.dipr_context:
        attempt(f"decode dipr {args.dipr_context}", 5 if smoke else 60,
                lambda: decode_dipr(model, cfg, args.dipr_context, args, log, tmp, files))
    for ch in args.extra_prefill_chunks:
        attempt(f"prefill {args.prefill_tokens} chunk {ch}", 5 if smoke else 30,
                lambda ch=ch: prefill(engine, cfg, args.prefill_tokens, ch, args, log, tmp, files, trace=False))
    res["meta"]["total_s"] = time.perf_counter() - t_start
    res["files"] = files
    _write(res, args)
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"done in {res['meta']['total_s']:.0f} s; files: {', '.join(files)}")
    print(markdown(res))


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


def _write(res, args):
    harness.write_results(args.out, NAME, res, markdown(res))


if __name__ == "__main__":
    sys.exit(main())
