"""Scheduler settings: the cluster layout (`parse_cluster`) and the policy with its knobs (`PolicyConfig`).

Cluster strings (docs/algorithm.md, Roles and clusters): a count and a role, repeated — "1P1M", "2P2M",
"2C", "1P1D" — or the explicit form with tensor parallelism per worker, "P:tp2,M:tp2,M:tp2" (the simulator
ignores tp; the real engine carves meshes from it). Roles:
    P  prefill worker: prefills only, hands the KV cache to an M or D worker
    M  multiplexing worker: decodes, and runs inline prefills in mixed steps (tropical)
    D  decode worker: decodes only (disaggregated)
    C  colocated worker: prefills and decodes (colocated, chunked)
Workers are named role + index within the role: P0, P1, M0, ...
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace

from tropical_jax.sched.baselines import resolve
from tropical_jax.sched.recalibrate import MIN_STEPS

ROLES = ("P", "M", "D", "C")
POLICIES = ("tropical", "planned", "colocated", "chunked", "disaggregated")
MULTIPLEXING = ("tropical", "planned")  # policies with P + M workers and the rule 1-3 dispatcher
_UNSET = -1  # a knob whose default depends on the policy
SWITCHES = ("shed", "handoff_guard", "arrival_guard", "harmless_first")  # on/off knobs, on by default for planned only
# Roles each policy runs on; every listed role with a "+" must appear at least once.
_POLICY_ROLES = {
    "tropical": ({"P", "M"}, {"M"}),
    "planned": ({"P", "M"}, {"M"}),
    "colocated": ({"C"}, {"C"}),
    "chunked": ({"C"}, {"C"}),
    "disaggregated": ({"P", "D"}, {"P", "D"}),
}


@dataclass(frozen=True)
class WorkerSpec:
    name: str   # "P0", "M1", ...
    role: str   # one of ROLES
    tp: int = 1


@dataclass(frozen=True)
class ClusterSpec:
    workers: tuple[WorkerSpec, ...]
    text: str = ""

    def by_role(self, role: str) -> list[WorkerSpec]:
        return [w for w in self.workers if w.role == role]

    def __str__(self) -> str:
        return self.text or ",".join(f"{w.role}:tp{w.tp}" for w in self.workers)


def parse_cluster(text: str | ClusterSpec) -> ClusterSpec:
    """"1P1M" / "2C" / "P:tp2,M:tp2" -> ClusterSpec. Raises ValueError on anything else."""
    if isinstance(text, ClusterSpec):
        return text
    s = text.strip()
    roles: list[tuple[str, int]] = []
    if ":" in s or "," in s:
        for part in s.split(","):
            m = re.fullmatch(r"\s*([PMDC])(?::tp(\d+))?\s*", part)
            if not m:
                raise ValueError(f"bad worker {part!r} in cluster {text!r} (expected e.g. 'P:tp2')")
            roles.append((m.group(1), int(m.group(2) or 1)))
    else:
        if not re.fullmatch(r"(\d+[PMDC])+", s):
            raise ValueError(f"bad cluster {text!r} (expected e.g. '1P1M', '2C', '1P1D')")
        for n, role in re.findall(r"(\d+)([PMDC])", s):
            roles.extend([(role, 1)] * int(n))
    if not roles:
        raise ValueError(f"cluster {text!r} has no workers")
    counts = {r: 0 for r in ROLES}
    workers = []
    for role, tp in roles:
        if tp < 1:
            raise ValueError(f"tp must be >= 1 in cluster {text!r}")
        workers.append(WorkerSpec(f"{role}{counts[role]}", role, tp))
        counts[role] += 1
    return ClusterSpec(tuple(workers), s)


def default_policy(cluster: str | ClusterSpec) -> str:
    """The policy a cluster runs when none is named: by its roles. P+M clusters get `planned`
    (docs/algorithm.md, The planned policy), which beat the paper's `tropical` rules in
    bench/results/beyond_paper.md."""
    roles = {w.role for w in parse_cluster(cluster).workers}
    return "colocated" if roles == {"C"} else "disaggregated" if "D" in roles else "planned"


@dataclass(frozen=True)
class PolicyConfig:
    """A dispatch policy and every knob of docs/algorithm.md. Times in seconds."""
    policy: str = "tropical"
    # Order of rules 1 and 2: try a prefill worker first, a multiplexing worker first, or ("finish",
    # docs/algorithm.md, Earliest first token) whichever gives the earlier first token, ties to P.
    # Default: finish for planned, else prefill.
    prefer: str = ""
    # Longest prompt that may be inlined on an M worker (None: no cap). Default: 8192; None for planned.
    max_multiplex_tokens: int | None = _UNSET
    # A prompt of at most this many tokens may be planned ahead of inlines queued on an M worker (behind
    # earlier jumpers) if the overtaken on-time inlines stay on time (docs/algorithm.md, The short-prompt
    # lane). Default: 2048 for planned; None (no jumping, the paper's FIFO inlines) for tropical.
    jump_tokens: int | None = _UNSET
    # Rule 1 places a prompt on a prefill worker only if no request queued there of at least this many
    # tokens turns late (0: every one, the paper's rule; None: none). A late request, placed best effort,
    # never makes another late. Shorter queued prompts pushed late are shed once hopeless (with shed on):
    # goodput counts requests, and protecting every queued prompt turned bursts of newcomers away.
    # Default: None for planned, 0 for every other policy.
    protect_tokens: int | None = _UNSET
    # Place a newcomer where it makes no queued prompt late whenever rule 1 or 2 can (protecting every
    # one, as protect_tokens=0), and only where none can, push the prompts protect_tokens leaves
    # unprotected (docs/algorithm.md, Queued prompts may be pushed late). Default: on for planned.
    harmless_first: bool | None = None
    # Reject a request whose prefill has not started once, started now alone (on the worker whose queue
    # holds it, or a prefill worker while it waits for a place), it could no longer end by its deadline:
    # at arrival and wherever it waits, for every policy alike (a miss, never dropped from the count).
    # Default: on for planned, off for every other policy.
    shed: bool | None = None
    # Prompts shorter than this skip the per-step slack check (their stall is below noise).
    short_prompt_tokens: int = 512
    # An inline is refused if the batch's predicted decode step (newcomer included) exceeds this x tpot_slo.
    decode_latency_watermark: float = 0.85
    # A new prompt is admitted to a worker only if its KV pages keep usage under this fraction.
    memory_watermark: float = 0.90
    # Every predicted time is multiplied by this before it is compared with a deadline or a slack.
    safety_factor: float = 1.02
    # Order of the dispatcher's waiting list and of every worker's local prefill queue:
    # sjf (shortest predicted prefill first; SRPT at chunk boundaries), edf (deadline), fcfs (arrival).
    # For disaggregated this is the prefill queue order (DistServe FCFS or SJF).
    queue_order: str = "sjf"
    # A request whose prefill has not started this long after arrival is rejected (HTTP 429). None: never.
    queue_timeout: float | None = None
    # Keep each M step short enough that a request a P worker hands over during it still gets its second
    # token within its TPOT; a step that ends before the next predicted handoff owes it nothing
    # (docs/algorithm.md, Step limits). False: only decodes already on (or in transit to) the M worker
    # are protected, as the paper's rules have it. Default: on for planned, off for every other policy.
    handoff_guard: bool | None = None
    # While no P worker will be free in time, keep each M step within the shortest first-token wait
    # (TTFT SLO less its own prefill) among recent arrivals, so a short prompt arriving then still finds
    # a worker free in time (docs/algorithm.md, Step limits). Default: on for planned, off for the rest.
    arrival_guard: bool | None = None
    # Rules 1 and 2 place a prompt only if the decode step of the batch it will join, counting every
    # request already placed to decode there (queued prefills included), stays within this x its TPOT:
    # past it every member of the batch misses its TPOT, where waiting (and being shed) costs the
    # newcomer alone (docs/algorithm.md, Room in the decode batch). None: no check. Default: 1.0 for
    # planned, None for every other policy.
    decode_commit_watermark: float | None = _UNSET
    # Slack a decode must keep at each of its tokens during a planned inline (s).
    slack_margin: float = 0.0
    # How prefill (P) workers run a prompt: "bucket", in chunks of the largest chunk bucket, the queue
    # order applied again at every chunk boundary (with sjf a shorter prompt preempts a longer one);
    # "whole", the whole prompt in one step, never preempted (DistServe as published).
    chunk: str = "bucket"
    # Prefill chunk sizes the engine has executables for. P workers use the largest; M workers the
    # largest that fits the slack budget.
    chunk_buckets: tuple[int, ...] = (128, 256, 512, 1024, 2048, 4096)
    # Tokens per step: chunked (Sarathi) puts decodes + one prefill chunk up to this budget in a step
    # (default 2048); colocated runs a prefill alone in chunks of at most this many tokens (default
    # None: the whole prompt in one step, i.e. a budget of max(8192, longest input)).
    token_budget: int | None = None
    # Default TTFT SLO for requests that carry none: ttft_scale x isolated prefill time.
    ttft_scale: float = 5.0
    # Largest decode batch one step may carry (the real engine's largest batch bucket); None: no cap.
    max_batch: int | None = None
    # Prefill segments one step may pack, back to back (P workers, and C workers of the colocated and
    # chunked baselines, as vLLM and Sarathi-Serve batch prefills); M workers inline one at a time.
    # 1: one prefill at a time (docs/algorithm.md, Per-worker batching). The real engine caps it at its
    # compiled segment slots.
    max_prefill_seqs: int = 1
    # Running recalibration (sched/recalibrate.py): plan with each kind of step's time scaled by the median
    # real/predicted time of the last this-many steps of its kind. 0: plan with the profile as it is.
    # Default: 64 for planned (its plans spend slack by the millisecond), 0 for the other policies.
    recalibrate_steps: int = _UNSET
    # Pages the packed segments of one step may read together (the real engine's largest context
    # bucket); None: no cap.
    max_pack_pages: int | None = None

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose from {POLICIES}")
        planned = self.policy == "planned"
        if not self.prefer:
            object.__setattr__(self, "prefer", "finish" if planned else "prefill")
        if self.max_multiplex_tokens == _UNSET:
            object.__setattr__(self, "max_multiplex_tokens", None if planned else 8192)
        if self.jump_tokens == _UNSET:
            object.__setattr__(self, "jump_tokens", 2048 if planned else None)
        for knob in SWITCHES:
            if getattr(self, knob) is None:
                object.__setattr__(self, knob, planned)
        if self.decode_commit_watermark == _UNSET:
            object.__setattr__(self, "decode_commit_watermark", 1.0 if planned else None)
        if self.protect_tokens == _UNSET:
            object.__setattr__(self, "protect_tokens", None if planned else 0)
        if self.recalibrate_steps == _UNSET:
            object.__setattr__(self, "recalibrate_steps", 64 if planned else 0)
        if self.prefer not in ("prefill", "multiplex", "finish"):
            raise ValueError(f"prefer must be 'prefill', 'multiplex' or 'finish', got {self.prefer!r}")
        if self.chunk not in ("bucket", "whole"):
            raise ValueError(f"chunk must be 'bucket' or 'whole', got {self.chunk!r}")
        if self.queue_order not in ("sjf", "edf", "fcfs"):
            raise ValueError(f"queue_order must be sjf, edf or fcfs, got {self.queue_order!r}")
        if not self.chunk_buckets or any(b <= 0 for b in self.chunk_buckets):
            raise ValueError("chunk_buckets must be positive sizes")
        object.__setattr__(self, "chunk_buckets", tuple(sorted(set(self.chunk_buckets))))
        if not 0 < self.memory_watermark <= 1:
            raise ValueError("memory_watermark is a fraction in (0, 1]")
        commit = self.decode_commit_watermark  # None: the check is off
        if self.decode_latency_watermark <= 0 or self.safety_factor <= 0 or (commit is not None and commit <= 0):
            raise ValueError("decode_latency_watermark, decode_commit_watermark and safety_factor must be positive")
        if self.token_budget is not None and self.token_budget <= 0:
            raise ValueError("token_budget must be positive")
        if self.queue_timeout is not None and self.queue_timeout < 0:
            raise ValueError("queue_timeout must be >= 0")
        if self.recalibrate_steps != 0 and self.recalibrate_steps < MIN_STEPS:
            raise ValueError(f"recalibrate_steps must be 0 (off) or >= {MIN_STEPS}, got {self.recalibrate_steps}")
        if self.max_prefill_seqs < 1 or (self.max_pack_pages is not None and self.max_pack_pages < 1):
            raise ValueError("max_prefill_seqs and max_pack_pages must be >= 1")

    @property
    def multiplexing(self) -> bool:
        return self.policy in MULTIPLEXING

    @property
    def chunked_budget(self) -> int:
        return 2048 if self.token_budget is None else self.token_budget

    def check_cluster(self, cluster: ClusterSpec) -> None:
        allowed, required = _POLICY_ROLES[self.policy]
        roles = {w.role for w in cluster.workers}
        if not roles <= allowed or not required <= roles:
            raise ValueError(f"policy {self.policy!r} runs on roles {sorted(allowed)} (needs {sorted(required)}); "
                             f"cluster {cluster} has {sorted(roles)}")

    @classmethod
    def parse(cls, text: str | "PolicyConfig", **overrides) -> "PolicyConfig":
        """"tropical", "chunked:token_budget=512,queue_order=fcfs" (knobs after a colon) or a baseline's
        name ("distserve", sched/baselines.py) -> PolicyConfig."""
        if isinstance(text, PolicyConfig):
            return replace(text, **overrides) if overrides else text
        name, _, rest = resolve(text).partition(":")
        kw: dict = {}
        types = {f.name: f.type for f in fields(cls)}
        for item in filter(None, (x.strip() for x in rest.split(","))):
            k, eq, v = item.partition("=")
            if not eq or k not in types:
                raise ValueError(f"bad policy knob {item!r}; knobs: {sorted(types)}")
            kw[k] = _parse_value(k, v)
        kw.update(overrides)
        return cls(policy=name.strip(), **kw)


def _parse_value(key: str, v: str):
    if v.lower() in ("none", "null"):
        return None
    if key == "chunk_buckets":
        return tuple(int(x) for x in v.split("/"))
    if key in ("prefer", "queue_order", "policy", "chunk"):
        return v
    if key in SWITCHES:
        if v.lower() not in ("true", "false", "1", "0", "on", "off"):
            raise ValueError(f"{key} must be true or false, got {v!r}")
        return v.lower() in ("true", "1", "on")
    if key in ("max_multiplex_tokens", "jump_tokens", "protect_tokens", "short_prompt_tokens", "token_budget", "max_batch",
               "max_prefill_seqs", "max_pack_pages", "recalibrate_steps"):
        return int(v)
    return float(v)
