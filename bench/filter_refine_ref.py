"""NumPy reference of filter–refine DIPR over per-key codes (alaya-independent; docs/design.md §4).

Used by ``code_choice.py`` (which code, on real SmolLM2 keys) and ``proxy_check.py``
(does the 8B-shape proxy reproduce the shares). Everything is float64 on the host.

Codes (built once per key, query-independent; keys in a rotated basis ``k' = R k``):

* ``scalar``: per-key symmetric b-bit scalar code with levels −L..L (L = 2^(b−1) − 1:
  int8 ±127, int4 ±7, int3 ±3, int2 ±1), an f16 scale ``max|k'|/L`` rounded up (so
  nothing clips and every coordinate error is ≤ scale/2) and ``‖e‖₂`` (the key's
  own error) rounded up to f16. Estimate ``ŝ = q'·k̂``, bound
  ``δ = min(‖q'‖₁·scale/2, ‖q'‖₂·‖e‖₂)``. With ``group``, one scale per ``group``
  dimensions and ``Σ_g ‖q'_g‖₁·scale_g/2`` in the first term.
* ``residual``: the int4 code plus a second 4-bit plane of its residual (own f16
  scale and error norm), read only for the int4 candidates (two-stage filter).
* ``sign``: 1 bit a dimension, x̄ = sign(k')/√D, with ‖k‖ and c = ⟨x̄, k/‖k‖⟩ stored
  as f32. Deterministic cone bound: k = ‖k‖(c·x̄ + √(1−c²)·u) with u ⊥ x̄ a unit
  vector, so q·k ∈ ‖k‖(c·a ± √(1−c²)·√(‖q‖² − a²)), a = q·x̄ (RaBitQ's geometry,
  but the worst case instead of its probabilistic error).

Every bound gets a slack of 1e-9·‖q‖₂·‖k‖₂ for the float64 rotation.

The query (``evaluate``): sink ``[0, sink)`` and window ``(p − window, p]`` are scored
exactly; the searched keys are the rest. ``M_lb = max(exact sink/window scores,
max_i(ŝ_i − δ_i))``; candidates: ``ŝ_i + δ_i ≥ M_lb − β`` for some query head of
the GQA group; ``sw`` variant: against ``M_sw − β`` (M_sw: exact sink/window max).
Every key with ``q·k ≥ M − β`` (M: exact max over all keys) must be a candidate of
its head; misses are counted (a failure), never hidden.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SLACK = 1e-9


def hadamard(d: int) -> np.ndarray:
    """Sylvester Hadamard matrix [d, d] (d a power of two), entries ±1."""
    if d < 1 or d & (d - 1):
        raise ValueError(f"head dim {d} is not a power of two")
    h = np.ones((1, 1))
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    return h


def rotation(d: int, seed) -> np.ndarray:
    """Orthogonal [d, d]: normalized Hadamard times random signs (``k' = R @ k``)."""
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=d)
    return hadamard(d) / np.sqrt(d) * signs[None, :]


def f16_up(x: np.ndarray) -> np.ndarray:
    """x rounded up to the next float16 (as float64)."""
    x = np.asarray(x, np.float64)
    h = x.astype(np.float16)
    low = h.astype(np.float64) < x
    h[low] = np.nextafter(h[low], np.float16(np.inf))
    return h.astype(np.float64)


def _scalar(kr: np.ndarray, levels: int, group: int | None = None):
    """Per-key symmetric quantization of kr [S, D] with one scale per ``group`` dimensions (None: the
    whole key): (k̂ [S, D], scale [S, D/group], ‖e‖₂ rounded up [S])."""
    s, d = kr.shape
    g = d if group is None else group
    if d % g:
        raise ValueError(f"scale group {g} does not divide head dim {d}")
    kg = kr.reshape(s, d // g, g)
    scale = np.maximum(f16_up(np.abs(kg).max(2) / levels), np.finfo(np.float16).tiny)
    c = np.clip(np.rint(kg / scale[..., None]), -levels, levels)
    kh = (c * scale[..., None]).reshape(s, d)
    return kh, scale, f16_up(np.linalg.norm(kr - kh, axis=1))


@dataclasses.dataclass(frozen=True)
class CodeSpec:
    """A key code: ``kind`` scalar | residual | sign; ``bits`` a dimension (first plane);
    ``rotate``: random-sign Hadamard first; ``group``: one f16 scale per ``group`` dimensions
    (None: one a key). ``bytes_per_key(d)``: what a scan reads per key."""
    name: str
    kind: str
    bits: int
    rotate: bool = True
    group: int | None = None

    def bytes_per_key(self, d: int) -> float:
        if self.kind == "sign":
            return d / 8 + 8  # bits + f32 norm + f32 c
        scales = 1 if self.group is None else d // self.group
        return d * self.bits / 8 + 2 * scales + 2  # codes + f16 scales + f16 ‖e‖


CODES = (
    CodeSpec("int8 rotated", "scalar", 8),
    CodeSpec("int4 rotated", "scalar", 4),
    CodeSpec("int4 rotated, scale per 32 dims", "scalar", 4, group=32),
    CodeSpec("int4 no rotation", "scalar", 4, rotate=False),
    CodeSpec("int4 rotated + 4-bit residual", "residual", 4),
    CodeSpec("int3 rotated", "scalar", 3),
    CodeSpec("int2 rotated", "scalar", 2),
    CodeSpec("1-bit sign rotated (cone bound)", "sign", 1),
)
RESIDUAL_BYTES = lambda d: d / 2 + 4  # noqa: E731  second plane + f16 scale + f16 ‖e‖


class Coded:
    """One code of keys k [S, D] (float64) in the basis ``rot`` [D, D]."""

    def __init__(self, spec: CodeSpec, k: np.ndarray, rot: np.ndarray):
        self.spec = spec
        self.rot = rot if spec.rotate else np.eye(k.shape[1])
        kr = k @ self.rot.T
        self.knorm = np.linalg.norm(k, axis=1)
        if spec.kind == "sign":
            d = k.shape[1]
            self.xbar = np.where(kr >= 0, 1.0, -1.0) / np.sqrt(d)
            self.c = np.abs(kr).sum(1) / np.sqrt(d) / np.maximum(self.knorm, 1e-300)
            return
        self.kh, self.scale, self.enorm = _scalar(kr, 2 ** (spec.bits - 1) - 1, spec.group)
        if spec.kind == "residual":
            rh, self.scale2, self.enorm2 = _scalar(kr - self.kh, 7, spec.group)
            self.kh2 = self.kh + rh

    def bound(self, q: np.ndarray, stage: int = 1):
        """q [..., D] → (ŝ, δ) [..., S]: |q·k − ŝ| ≤ δ for every key."""
        qr = q @ self.rot.T
        q2 = np.linalg.norm(qr, axis=-1)[..., None]
        slack = SLACK * q2 * self.knorm
        if self.spec.kind == "sign":
            a = qr @ self.xbar.T
            est = self.knorm * self.c * a
            half = self.knorm * np.sqrt(np.maximum(1 - self.c ** 2, 0)) * np.sqrt(np.maximum(q2 ** 2 - a ** 2, 0))
            return est, half + slack
        kh, scale, enorm = (self.kh2, self.scale2, self.enorm2) if stage == 2 else (self.kh, self.scale, self.enorm)
        ng = scale.shape[1]
        q1 = np.abs(qr).reshape(qr.shape[:-1] + (ng, -1)).sum(-1)  # ‖q'‖₁ of each scale group [..., ng]
        l1 = q1 @ scale.T / 2  # Σ_groups ‖q'_g‖₁·scale_g/2 [..., S]
        return qr @ kh.T, np.minimum(l1, q2 * enorm) + slack


def evaluate(k: np.ndarray, q: np.ndarray, pos: np.ndarray, codes: list[Coded], betas, *,
             sink: int = 4, window: int = 64) -> dict:
    """Filter–refine of queries q [J, G, D] at positions pos [J] over keys k [S, D] (key t is
    visible to query j iff t ≤ pos[j]).

    Returns per-query counts (arrays [nβ, J]): ``searched``, ``in_range_head`` (mean over
    the G heads), ``in_range_union``, and per code name: ``cand``, ``cand_sw`` (group
    unions of searched keys), ``fn``, ``fn_sw`` (missed in-range (head, key) pairs),
    for residual codes also ``cand1``/``cand1_sw`` (the first-stage int4 candidates)."""
    s_all = np.arange(k.shape[0])
    valid = s_all[None, :] <= pos[:, None]  # [J, S]
    search = (s_all[None, :] >= sink) & (s_all[None, :] <= pos[:, None] - window)
    sw = valid & ~search
    sc = np.einsum("jgd,sd->jgs", q, k)
    m = np.where(valid[:, None], sc, -np.inf).max(-1)  # [J, G]
    m_sw = np.where(sw[:, None], sc, -np.inf).max(-1)
    sr = search[:, None]  # [J, 1, S]
    betas = np.asarray(betas, np.float64)
    nb, J = len(betas), q.shape[0]
    out = {"searched": np.broadcast_to(search.sum(1), (nb, J)).astype(np.int64),
           "in_range_head": np.zeros((nb, J)), "in_range_union": np.zeros((nb, J), np.int64)}
    in_rng = []
    for i, b in enumerate(betas):
        r = sr & (sc >= (m - b)[..., None])
        in_rng.append(r)
        out["in_range_head"][i] = r.sum(-1).mean(-1)
        out["in_range_union"][i] = r.any(1).sum(-1)
    for c in codes:
        est, dl = c.bound(q)
        lb = np.where(sr, est - dl, -np.inf).max(-1)
        m_lb = np.maximum(m_sw, lb)  # [J, G]
        if np.any(m_lb > m + 1e-9 * np.abs(m)):
            raise AssertionError(f"{c.spec.name}: M_lb above the exact max")
        ub = np.where(sr, est + dl, -np.inf)
        res = {key: np.zeros((nb, J), np.int64) for key in ("cand", "cand_sw", "fn", "fn_sw")}
        if c.spec.kind == "residual":
            est2, dl2 = c.bound(q, stage=2)
            res.update(cand1=np.zeros((nb, J), np.int64), cand1_sw=np.zeros((nb, J), np.int64))
        for i, b in enumerate(betas):
            for suffix, thr_m in (("", m_lb), ("_sw", m_sw)):
                cg = ub >= (thr_m - b)[..., None]  # [J, G, S]
                if c.spec.kind == "residual":
                    c1 = cg.any(1, keepdims=True)  # first-stage union, refined by the second plane
                    res["cand1" + suffix][i] = c1[:, 0].sum(-1)
                    lb2 = np.where(c1, est2 - dl2, -np.inf).max(-1)
                    m2 = np.maximum(thr_m, lb2)
                    cg = c1 & (est2 + dl2 >= (m2 - b)[..., None])
                res["cand" + suffix][i] = cg.any(1).sum(-1)
                res["fn" + suffix][i] = (in_rng[i] & ~cg).sum((1, 2))
        out[c.spec.name] = res
    return out
