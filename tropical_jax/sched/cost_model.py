"""Latency cost model: how long a prefill, a chunk, a decode step, a mixed step and a KV transfer take.

All methods return **seconds**; profiles are written in **milliseconds**.

Forms (docs/algorithm.md, Cost model):
    t_prefill(L)            = c2·L² + c1·L + c0                        one request alone
    t_chunk(C, ctx)         = k2·C² + kx·C·ctx + k1·C + k0             C new tokens on top of ctx cached ones
    t_decode(B, T)          = d0 + d1·B + d2·T                         B requests reading T KV tokens in all
    t_mixed(C, ctx, B, T)   = m0 + mc2·C² + mcx·C·ctx + mc1·C + mb·B + mt·T   one chunk + a decode batch
    t_transfer(tokens)      = latency + tokens · kv_bytes_per_token / bandwidth
A step with no chunk is a decode step, a step with no decodes is a chunk; t_decode(0, ·) = 0.

JSON profile schema (one object; unknown keys are kept in `extra` and ignored):
    {
      "name":   "a100-internlm2.5-20b-tp2",          optional
      "source": "where every number comes from",     optional, strongly recommended
      "units":  "ms",                                 required, must be "ms"
      "prefill": {"c2": .., "c1": .., "c0": ..}                    required: coefficients (ms)
                 | {"points": [[L, ms], ...]}                       or points (>= 3), least-squares fit
                 | {"points": {"512": 63, "1024": 115, ...}}        (same, as a mapping L -> ms)
      "chunk":   {"k2": .., "kx": .., "k1": .., "k0": ..}          optional: coefficients
                 | {"points": [[C, ctx, ms], ...]}                  or points (>= 4, ctx varied)
                 absent -> derived from prefill: k2 = c2, kx = 2·c2, k1 = c1, k0 = c0, so that
                 t_chunk(L, 0) = t_prefill(L) and the attention term of a chunk is c2·((ctx+C)² − ctx²).
      "decode":  {"d0": .., "d1": .., "d2": ..}                    required: coefficients (ms)
                 | {"points": [[B, T, ms], ...]}                    or points (>= 3, B and T varied)
      "mixed":   {"m0","mc2","mcx","mc1","mb","mt"}                optional: coefficients (ms)
                 | {"points": [[C, ctx, B, T, ms], ...]}            or points (>= 6, all features varied)
                 (the engine's profiler measures mixed steps and writes points: they are fitted and used)
                 absent -> t_mixed = t_chunk + t_decode − min(c0, d0) (one step's fixed overhead is
                 shared; published profiles have no mixed-step data) and `mixed_derived` is True.
    Any points section may pin coefficients the points cannot separate, e.g. with one context bucket
    {"points": [...], "fixed": {"mcx": 0, "mt": 0}}: those are taken as given, the rest fitted.
    Fitted coefficients are never negative: a negative one (noisy timings) is pinned to 0, the rest refitted.
      "kv_bytes_per_token": 196608                                  required: this ...
      "model": {"num_layers": 48, "num_kv_heads": 8, "head_dim": 128, "dtype_bytes": 2}
                                                                    ... or the model shape, from which
                 kv_bytes_per_token = 2 (K and V) · layers · kv_heads · head_dim · dtype_bytes.
      "transfer": {"bandwidth_GBps": 200, "latency_ms": 1.0}        required (GB = 1e9 bytes)
      "kv_capacity_tokens": 500000                                  optional: KV tokens one worker holds
      "contention": {"factor": 1.4}                                 optional (default 1): a step that
                 starts while another worker of the cluster runs one takes this x longer (workers that
                 share one host's cores, e.g. emulated CPU devices). Only the simulator's executor
                 applies it: the scheduler plans with the times alone.
    }
A missing file, a missing required section, a wrong unit or too few points raises `ProfileError`:
a scheduler without a cost model must not silently stop multiplexing (a defect of the reference
implementation).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace

import numpy as np

from tropical_jax.sched.plan import packed_shape


class ProfileError(ValueError):
    """The latency profile is missing or unusable."""


def _lstsq(rows: list[list[float]], ys: list[float], names: tuple[str, ...], what: str) -> dict[str, float]:
    a = np.asarray(rows, dtype=float)
    y = np.asarray(ys, dtype=float)
    if a.shape[0] < a.shape[1]:
        raise ProfileError(f"{what}: {a.shape[0]} points cannot fit {a.shape[1]} coefficients {names}")
    coef, _, rank, _ = np.linalg.lstsq(a, y, rcond=None)
    if rank < a.shape[1]:
        raise ProfileError(f"{what}: points do not vary every feature of {names} (rank {rank}); "
                           "profile more shapes or give coefficients")
    return {n: float(c) for n, c in zip(names, coef)}


def _points(section, width: int, what: str) -> list[list[float]]:
    pts = section["points"]
    if isinstance(pts, dict):  # {"512": 63, ...} -> [[512, 63], ...]
        pts = [[float(k), v] for k, v in pts.items()]
    out = []
    for p in pts:
        if len(p) != width:
            raise ProfileError(f"{what}: each point needs {width} numbers, got {p!r}")
        out.append([float(x) for x in p])
    return out


def _section(d: dict, key: str, names: tuple[str, ...], features, width: int) -> dict[str, float]:
    """Coefficients (ms) of one section, given directly or fitted from points."""
    sec = d[key]
    if not isinstance(sec, dict):
        raise ProfileError(f"profile section {key!r} must be an object")
    if "points" in sec:
        pts = _points(sec, width, key)
        fixed = {n: float(v) for n, v in (sec.get("fixed") or {}).items()}
        unknown = set(fixed) - set(names)
        if unknown:
            raise ProfileError(f"{key}: 'fixed' names unknown coefficients {sorted(unknown)}; known {names}")
        feats = [features(*p[:-1]) for p in pts]
        while True:
            free = [i for i, n in enumerate(names) if n not in fixed]
            rows = [[f[i] for i in free] for f in feats]
            ys = [p[-1] - sum(fixed[n] * f[i] for i, n in enumerate(names) if n in fixed) for p, f in zip(pts, feats)]
            fit = _lstsq(rows, ys, tuple(names[i] for i in free), key) if free else {}
            # No step gets faster with more work: a negative coefficient is noise (a busy host, few
            # points). Pin the most negative to 0 and fit the rest again.
            worst = min(fit, key=fit.get, default=None)
            if worst is None or fit[worst] >= 0:
                return {n: fixed.get(n, fit.get(n)) for n in names}
            fixed[worst] = 0.0
    missing = [n for n in names if n not in sec]
    if missing:
        raise ProfileError(f"profile section {key!r} lacks {missing} (or give 'points')")
    return {n: float(sec[n]) for n in names}


@dataclass
class CostModel:
    # Coefficients in ms (as in the profile); methods convert to seconds.
    prefill: dict[str, float]            # c2, c1, c0
    chunk: dict[str, float]              # k2, kx, k1, k0
    decode: dict[str, float]             # d0, d1, d2
    mixed: dict[str, float] | None       # m0, mc2, mcx, mc1, mb, mt; None -> derived
    kv_bytes_per_token: int
    bandwidth_Bps: float                 # bytes per second
    transfer_latency: float              # s
    kv_capacity_tokens: int | None = None
    name: str = ""
    source: str = ""
    chunk_derived: bool = False
    contention: float = 1.0              # step time x this when another worker runs a step meanwhile
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def mixed_derived(self) -> bool:
        """True when mixed steps are estimated as t_chunk + t_decode − min(c0, d0) (no mixed data)."""
        return self.mixed is None

    def __post_init__(self):
        # The coefficients as plain floats: predictions run millions of times per simulated run.
        p, k, d = self.prefill, self.chunk, self.decode
        self._p = (p["c2"], p["c1"], p["c0"])
        self._k = (k["k2"], k["kx"], k["k1"], k["k0"])
        self._d = (d["d0"], d["d1"], d["d2"])
        m = self.mixed
        self._m = None if m is None else (m["m0"], m["mc2"], m["mcx"], m["mc1"], m["mb"], m["mt"])
        self._shared = min(p["c0"], d["d0"])  # ms: the fixed overhead a derived mixed step shares
        self._shared_s = self._shared * 1e-3

    # ---------------- predictions (seconds) ----------------
    def t_prefill(self, L: int) -> float:
        c2, c1, c0 = self._p
        return (c2 * L * L + c1 * L + c0) * 1e-3

    def t_chunk(self, C: int, ctx: int = 0) -> float:
        k2, kx, k1, k0 = self._k
        return (k2 * C * C + kx * C * ctx + k1 * C + k0) * 1e-3

    def t_decode(self, B: int, T: int) -> float:
        if B <= 0:
            return 0.0
        d0, d1, d2 = self._d
        return (d0 + d1 * B + d2 * T) * 1e-3

    def decode_ends(self, start: float, B: int, T: int, until: float, most: int) -> list[float]:
        """End times of up to `most` decode steps of B >= 1 requests run one after another from
        `start`, the first reading T KV tokens and each next one B more, while they end before
        `until`: the clock plus each step's t_decode, in one loop (a simulator fast-forwards
        thousands of such steps)."""
        d0, d1, d2 = self._d
        fixed = d0 + d1 * B  # t_decode's sum, in its order
        ends: list[float] = []
        for _ in range(most):
            end = start + (fixed + d2 * T) * 1e-3
            if not end < until:
                break
            ends.append(end)
            start, T = end, T + B
        return ends

    def t_mixed(self, C: int, ctx: int, B: int, T: int) -> float:
        if C <= 0:
            return self.t_decode(B, T)
        if B <= 0:
            return self.t_chunk(C, ctx)
        m = self._m
        if m is None:
            k2, kx, k1, k0 = self._k
            d0, d1, d2 = self._d
            return (k2 * C * C + kx * C * ctx + k1 * C + k0) * 1e-3 + (d0 + d1 * B + d2 * T) * 1e-3 - self._shared_s
        m0, mc2, mcx, mc1, mb, mt = m
        return (m0 + mc2 * C * C + mcx * C * ctx + mc1 * C + mb * B + mt * T) * 1e-3

    def t_plan(self, plan) -> float:
        """Predicted time of a StepPlan's shape: its packed chunk and its decode batch."""
        return self.t_mixed(*packed_shape(plan.chunks), len(plan.decodes), plan.decode_tokens)

    def max_chunk(self, ctx: int, B: int, T: int, budget: float, limit: int) -> int:
        """Largest chunk C in [0, limit] with t_mixed(C, ctx, B, T) <= budget (s); 0 if not even one token.

        Solves the step's quadratic in C, then corrects the rounding with direct evaluations, so the
        answer is exactly what a scan over all C would give (t_mixed grows with C).
        """
        if budget == math.inf:
            return limit
        if self._m is not None and B > 0:
            m0, mc2, mcx, mc1, mb, mt = self._m
            a, b, c = mc2, mcx * ctx + mc1, m0 + mb * B + mt * T
        else:
            k2, kx, k1, k0 = self._k
            a, b, c = k2, kx * ctx + k1, k0
            if B > 0:
                d0, d1, d2 = self._d
                c += (d0 + d1 * B + d2 * T) * 1e-3 * 1e3 - self._shared  # t_decode(B, T) in ms, inlined
        y = budget * 1e3 - c
        if a >= 0 and b >= 0:
            if y < a + b:
                return 0
            x = (-b + math.sqrt(b * b + 4 * a * y)) / (2 * a) if a > 0 else (y / b if b > 0 else limit)
            n = limit if x >= limit else int(x)
            # The step's time at C minus the budget is (C - x)(a(C + x) + b) ms. Where that is far from 0
            # (beyond any rounding) its sign settles the comparison; only near a tie is t_mixed evaluated.
            tol = 1e-9 * (abs(y) + abs(c) + a * limit * limit + b * limit + 1.0)
            while n < limit and ((n + 1 - x) * (a * (n + 1 + x) + b) <= tol
                                 and self.t_mixed(n + 1, ctx, B, T) <= budget):
                n += 1
            while n > 0 and ((x - n) * (a * (x + n) + b) <= tol and self.t_mixed(n, ctx, B, T) > budget):
                n -= 1
            return n
        lo, hi = 0, limit  # an odd fit (negative coefficient): bisect, assuming growth in C
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.t_mixed(mid, ctx, B, T) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def min_chunked_time(self, tokens: int, start: int, most: int, B: int, T: int) -> float:
        """A lower bound (s) on the summed t_mixed of any steps that prefill tokens [start, start + tokens)
        in chunks of at most `most` tokens, each beside B or more decodes reading T or more KV tokens,
        and on any decode-only steps among them; 0 where the coefficients give none (a negative one).

        A chunk c at ctx costs a0 + a2·c² + ax·c·ctx + a1·c (ms), and over any chunking
        sum(c·ctx) = start·N + (N² − sum(c²))/2, 0 < sum(c²) <= N·most, and N/most steps at least.
        Cheap next to planning those steps one by one (sched/inline_plans.py prunes plans with it)."""
        k2, kx, k1, k0 = self._k
        d0, d1, d2 = self._d
        if self._m is None:
            mixed = (k0 + d0 + d1 * B + d2 * T - self._shared, k2, kx, k1)
            growth = (d1, d2)  # what more decodes and tokens add
        else:
            m0, mc2, mcx, mc1, mb, mt = self._m
            mixed = (m0 + mb * B + mt * T, mc2, mcx, mc1)
            growth = (mb, mt)
        # Without decodes a step is a chunk alone, until a prefill ends and joins the batch.
        a0, a2, ax, a1 = mixed if B > 0 else (min(x, y) for x, y in zip(mixed, (k0, k2, kx, k1)))
        if tokens <= 0 or a0 < 0 or min(d0, d1, d2, *growth) < 0:
            return 0.0
        steps = -(-tokens // most)
        curve = a2 - ax / 2  # the coefficient of sum(c²)
        spread = curve * tokens * most if curve < 0 else 0.0  # sum(c²) at its largest, or dropped
        return (steps * a0 + spread + ax * (start * tokens + tokens * tokens / 2) + a1 * tokens) * 1e-3

    def scaled(self, factors: dict[str, float]) -> "CostModel":
        """This model with each kind of step's time x its factor (plan.STEP_KINDS; the prefill factor
        scales prefills and chunks); transfers and capacity unchanged."""
        def times(sec, kind):
            return None if sec is None else {k: v * factors.get(kind, 1.0) for k, v in sec.items()}

        return replace(self, prefill=times(self.prefill, "prefill"), chunk=times(self.chunk, "prefill"),
                       decode=times(self.decode, "decode"), mixed=times(self.mixed, "mixed"))

    def t_transfer(self, tokens: int) -> float:
        return self.transfer_latency + tokens * self.kv_bytes_per_token / self.bandwidth_Bps

    def t_prefill_chunked(self, L: int, chunk: int, start: int = 0) -> float:
        """Time to prefill tokens [start, L) alone in chunks of `chunk` tokens (how a P worker runs it)."""
        k2, kx, k1, k0 = self._k
        t, ctx = 0.0, start
        while ctx < L:
            c = min(chunk, L - ctx)
            t += (k2 * c * c + kx * c * ctx + k1 * c + k0) * 1e-3  # t_chunk(c, ctx), inlined: every chunk of a prompt
            ctx += c
        return t

    # ---------------- loading ----------------
    @classmethod
    def from_json(cls, src: str | os.PathLike | dict) -> "CostModel":
        """Load a profile from a path or an already-parsed dict. Raises ProfileError if unusable."""
        if isinstance(src, dict):
            d = src
        else:
            try:
                with open(src) as f:
                    d = json.load(f)
            except FileNotFoundError as e:
                raise ProfileError(f"latency profile not found: {src}") from e
            except json.JSONDecodeError as e:
                raise ProfileError(f"latency profile {src} is not valid JSON: {e}") from e
        if not isinstance(d, dict):
            raise ProfileError("a latency profile is a JSON object")
        if d.get("units") != "ms":
            raise ProfileError(f"profile 'units' must be \"ms\", got {d.get('units')!r}")
        for key in ("prefill", "decode", "transfer"):
            if key not in d:
                raise ProfileError(f"profile lacks required section {key!r}")

        prefill = _section(d, "prefill", ("c2", "c1", "c0"), lambda L: [L * L, L, 1.0], 2)
        if "chunk" in d:
            chunk = _section(d, "chunk", ("k2", "kx", "k1", "k0"),
                             lambda C, x: [C * C, C * x, C, 1.0], 3)
        else:
            chunk = {"k2": prefill["c2"], "kx": 2 * prefill["c2"], "k1": prefill["c1"], "k0": prefill["c0"]}
        decode = _section(d, "decode", ("d0", "d1", "d2"), lambda B, T: [1.0, B, T], 3)
        mixed = None
        if "mixed" in d:
            mixed = _section(d, "mixed", ("m0", "mc2", "mcx", "mc1", "mb", "mt"),
                             lambda C, x, B, T: [1.0, C * C, C * x, C, B, T], 5)

        if "kv_bytes_per_token" in d:
            kvb = int(d["kv_bytes_per_token"])
        elif "model" in d:
            m = d["model"]
            try:
                kvb = 2 * int(m["num_layers"]) * int(m["num_kv_heads"]) * int(m["head_dim"]) * int(m["dtype_bytes"])
            except KeyError as e:
                raise ProfileError(f"profile 'model' lacks {e}") from e
        else:
            raise ProfileError("profile needs 'kv_bytes_per_token' or 'model' (KV bytes per token)")
        tr = d["transfer"]
        try:
            bw = float(tr["bandwidth_GBps"]) * 1e9
            lat = float(tr["latency_ms"]) * 1e-3
        except (KeyError, TypeError) as e:
            raise ProfileError(f"profile 'transfer' needs bandwidth_GBps and latency_ms: {e}") from e
        cap = d.get("kv_capacity_tokens")
        try:
            contention = float(d.get("contention", {}).get("factor", 1.0))
        except (AttributeError, TypeError, ValueError) as e:
            raise ProfileError(f"profile 'contention' is {{\"factor\": number}}: {e}") from e
        known = {"name", "source", "units", "prefill", "chunk", "decode", "mixed", "kv_bytes_per_token",
                 "model", "transfer", "kv_capacity_tokens", "contention"}
        cm = cls(prefill=prefill, chunk=chunk, decode=decode, mixed=mixed, kv_bytes_per_token=kvb,
                 bandwidth_Bps=bw, transfer_latency=lat,
                 kv_capacity_tokens=None if cap is None else int(cap),
                 name=str(d.get("name", "")), source=str(d.get("source", "")),
                 chunk_derived="chunk" not in d, contention=contention,
                 extra={k: v for k, v in d.items() if k not in known})
        cm._validate()
        return cm

    def _validate(self) -> None:
        vals = [*self.prefill.values(), *self.chunk.values(), *self.decode.values(),
                *(self.mixed or {}).values()]
        if not all(math.isfinite(v) for v in vals):
            raise ProfileError("profile coefficients must be finite")
        if self.kv_bytes_per_token <= 0 or self.bandwidth_Bps <= 0 or self.transfer_latency < 0:
            raise ProfileError("kv_bytes_per_token and bandwidth must be positive, latency >= 0")
        if not (math.isfinite(self.contention) and self.contention > 0):
            raise ProfileError(f"contention factor must be positive, got {self.contention}")
        # A model that predicts non-positive times would make every plan look free.
        for L in (1, 128, 4096):
            if self.t_prefill(L) <= 0 or self.t_chunk(L, 0) <= 0:
                raise ProfileError(f"profile predicts a non-positive prefill time at L={L}")
        if self.t_decode(1, 1) <= 0:
            raise ProfileError("profile predicts a non-positive decode step time")

    def to_dict(self) -> dict:
        """Coefficient form of this model, loadable by from_json."""
        d = {"name": self.name, "source": self.source, "units": "ms", "prefill": dict(self.prefill),
             "decode": dict(self.decode), "kv_bytes_per_token": self.kv_bytes_per_token,
             "transfer": {"bandwidth_GBps": self.bandwidth_Bps / 1e9, "latency_ms": self.transfer_latency * 1e3}}
        if not self.chunk_derived:
            d["chunk"] = dict(self.chunk)
        if self.mixed is not None:
            d["mixed"] = dict(self.mixed)
        if self.kv_capacity_tokens is not None:
            d["kv_capacity_tokens"] = self.kv_capacity_tokens
        if self.contention != 1.0:
            d["contention"] = {"factor": self.contention}
        return d
