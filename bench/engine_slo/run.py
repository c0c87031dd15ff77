"""The real engine against its SLOs on this machine, then the simulator on the same workload
(docs/benchmarks.md, engine_slo).

    python -m bench.engine_slo [--duration 16] [--rates auto] [--out bench/results/engine_slo.json]
    python -m bench.engine_slo --resummarize bench/results/engine_slo.json   # goodputs and summary again

1. Profiles the embedded default model on this machine's devices (or reuses the cached profile), then
   calibrates it: the profiler times each step alone, but in a cluster two workers share this machine's
   cores (and other processes may run). Runs of chunked 2C, disaggregated 1P1D and planned 1P1M (its
   inlines are the mixed steps), Poisson at one rate whatever the workload, give the median
   real/predicted time of each kind of step; the profile with each kind scaled by its factor, plus the
   mean host time a busy worker spends after that kind of step (a prefill's KV copy, token handling,
   planning), is what the engine schedules with and the simulator simulates. The KV handoff is timed on
   the 1P1D cluster's own workers (latency and bandwidth of its page copy) instead of the profile's constant.
   Each replay is also simulated on the uncalibrated profile, and both errors are reported.
2. Scales a real trace down to the model (lengths x --input-scale / --output-scale, capped to its
   context) and scales the SLOs to the measured profile (cached per machine, so every run of a command
   on a machine asks the same): TTFT SLO = --ttft-scale x the request's isolated prefill, TPOT SLO =
   --tpot-scale x the decode step at the middle batch bucket.
3. Runs every policy on a cluster of two workers (`1P1M` tropical and planned, `2C` colocated and
   chunked, `1P1D` disaggregated) on the real clock: an open-loop driver submits requests at their
   Poisson (or Gamma, --arrival gamma --cv 2) arrival times; attainment at each rate, goodput the highest
   rate meeting the target (report.crossing). At each seed and rate every policy runs before the
   next rate (their order rotating), so a drift of the machine's speed falls on all policies alike, and
   report.paired compares them seed by seed. Before each seed x rate block the machine is timed
   against the profile (calibration.machine_speed, recorded); with --speed-blocks the block's arrival
   times, SLOs and the profiles its engines plan with are dilated by that speed.
4. Replays each real run in the simulator (same requests, their actual arrival times, the same policy
   and calibrated profile) and reports the relative error of its P90 TTFT, P90 TPOT and attainment;
   also the simulator's own goodput search on that profile and the workload (which picks the rates).

The two workers share this machine's CPU cores (the profile times a step alone), and other processes
may run beside the benchmark: the JSON records the machine, its load and that caveat. Comparisons
between policies are within one run, on one profile.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

# Two workers need two devices: emulate them on a CPU host (before JAX starts); other platforms ignore this.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from tropical_jax.engine.build import engine_policy  # noqa: E402
from tropical_jax.sched.cost_model import CostModel  # noqa: E402
from tropical_jax.sched.metrics import summarize  # noqa: E402
from tropical_jax.sched.request import Request  # noqa: E402

from bench.machine import cpu_model  # noqa: E402
from .report import ERROR_KEYS, POLICIES, VARIANTS, command_line, p90s, rel_err, save, summarize_result  # noqa: E402
from .sim import (ENGINE, RESULTS, policy_text, replay, run_requests, scaled_requests,  # noqa: E402
                            sim_goodput, sim_window_curves, slo_batch, tpot_slo_for)
from .calibration import KINDS, StepWatch, calibrated_profile, machine_speed, mean_gaps_ms, step_ratio  # noqa: E402

def machine() -> dict:
    import jax

    return {"platform": platform.platform(), "cpu": cpu_model(), "cpus": os.cpu_count(), "jax": jax.__version__,
            "backend": jax.default_backend(), "devices_emulated": len(jax.devices()),
            "shared": "the two workers share this machine's cores, while the profile timed each step alone; "
                      "other processes are not excluded (see the load averages)",
            "load_average_start": os.getloadavg()}


def run_real(eng, reqs, bar) -> list[Request]:
    """Submit each request at its arrival time (open loop, real clock); wait for all to finish."""
    from tropical_jax import SamplingParams

    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(0, eng.vocab_size, r.prompt_len))) for r in reqs]
    start = time.monotonic()
    submitted = []
    for i, (r, prompt) in enumerate(zip(reqs, prompts)):
        wait = start + r.arrival - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        sp = SamplingParams(max_tokens=r.max_tokens, temperature=0, ignore_eos=True)
        submitted.append(eng.add_request(f"bench-{i}", prompt, sp, r.ttft_slo, r.tpot_slo))
        bar.set_postfix_str(f"submitted {len(submitted)}/{len(reqs)}")
    eng.run_until_done(submitted, timeout=600)
    return submitted


def first_worker(llm):
    return next(iter(llm.engine.workers.values()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.engine_slo", description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="mooncake-conversation")
    ap.add_argument("--input-scale", type=float, default=1 / 64)
    ap.add_argument("--output-scale", type=float, default=1 / 16)
    ap.add_argument("--max-output-len", type=int, default=48)
    ap.add_argument("--ttft-scale", type=float, default=10.0,
                    help="TTFT SLO: this x the request's isolated prefill on the measured profile")
    ap.add_argument("--tpot-scale", type=float, default=6.0,
                    help="TPOT SLO: this x the measured decode step at the middle batch bucket")
    ap.add_argument("--duration", type=float, default=16.0, help="seconds of arrivals per real run")
    ap.add_argument("--calibrate", type=float, default=20.0, help="seconds of arrivals of each calibration run")
    ap.add_argument("--calibrate-rate", type=float, default=None,
                    help="req/s (Poisson) of the calibration runs; default: the median of --rates, or with --rates auto "
                         "0.12 x the simulated Poisson goodput on the measured profile (which ignores the contention)")
    ap.add_argument("--rates", default="auto", help="comma-separated req/s, or auto (around the simulated goodputs)")
    ap.add_argument("--num-rates", type=int, default=5)
    ap.add_argument("--policies", default=",".join(p for p, _ in POLICIES if p not in VARIANTS))
    ap.add_argument("--target", type=float, default=0.9)
    ap.add_argument("--no-shed", dest="shed", action="store_false",
                    help="do not reject hopeless requests at once (default: every policy sheds them)")
    ap.add_argument("--arrival", choices=("poisson", "gamma"), default="poisson")
    ap.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of Gamma inter-arrival times")
    ap.add_argument("--seeds", type=int, default=1, help="runs (request seeds) per rate, pooled")
    ap.add_argument("--first-seed", type=int, default=0,
                    help="seeds first-seed .. first-seed + seeds - 1 (another value repeats a run on fresh requests)")
    ap.add_argument("--reprofile", action="store_true", help="measure the profile again instead of reusing the cached one")
    ap.add_argument("--prefill-seqs", type=int, default=1,
                    help="prompts one step may pack (P workers, colocated and chunked; max_prefill_seqs)")
    ap.add_argument("--recalibrate-steps", type=int, default=None,
                    help="PolicyConfig.recalibrate_steps of every policy (0: off); default each policy's own "
                         "(64 for planned, 0 for the rest). Calibration runs always plan with the profile as given")
    ap.add_argument("--handoff-guard", action="store_true",
                    help="cap M steps so a request handed over mid-step keeps its TPOT (PolicyConfig.handoff_guard)")
    ap.add_argument("--speed-blocks", action=argparse.BooleanOptionalAction, default=False,
                    help="count time at the profile's speed: before each seed x rate block, and the calibration, the "
                         "machine is timed against the profile (calibration.machine_speed) and that block's "
                         "arrival times, SLOs and every profile its engines plan with and its replays simulate are x "
                         "its speed (rates nominal, req/s at the profile's speed). Off by default: on the 2-core VM "
                         "this one-second probe swung 0.57-1.07 between blocks while the steps the runs made stayed "
                         "within 1.0-1.2 of the profile. The speed is recorded either way")
    ap.add_argument("--sim-requests", type=int, default=400)
    ap.add_argument("--sim-seeds", type=int, default=2)
    ap.add_argument("--sim-window-seeds", type=int, default=30,
                    help="seeds of the simulator's runs shaped like the real ones (sim_window_curves; 0: none)")
    ap.add_argument("--out", default=str(RESULTS / "engine_slo.json"))
    ap.add_argument("--resummarize", metavar="FILE",
                    help="only redo the goodputs, summary and plot of a result file from its stored runs")
    args = ap.parse_args(argv)
    if args.resummarize:
        out = json.loads(Path(args.resummarize).read_text())
        summarize_result(out)
        save(out, Path(args.resummarize))
        return 0
    t_start = time.time()

    from tropical_jax import LLM
    from tropical_jax.cluster.profile_cache import cached_profile
    from tropical_jax.config import EngineConfig

    cfg = EngineConfig(**ENGINE)
    measured, profile_path, reused = cached_profile(None, cfg, progress=True, refresh=args.reprofile)
    raw = CostModel.from_json(measured)
    chosen = [(p, c) for p, c in POLICIES if p in args.policies.split(",")]

    # The SLOs are fixed by the profile as measured (cached per machine), so every run of one command on one
    # machine serves the same workload; the calibration below changes what is predicted, not what is asked.
    tpot_slo, step = tpot_slo_for(raw, cfg, args.tpot_scale)

    # Calibration: the profile times one step alone; in the cluster two workers share the cores (and
    # this machine is shared). Run chunked 2C, disaggregated 1P1D and planned 1P1M and scale the profile by
    # the median real/predicted step time, so that scheduling and simulation start from the steps as they really run.
    # Always Poisson at one rate for every policy and arrival process (see --calibrate-rate): a bursty
    # workload's calibration must not measure a busier machine than a smooth one's.
    poisson = argparse.Namespace(**{**vars(args), "arrival": "poisson"})
    given = None if args.rates == "auto" else [float(x) for x in args.rates.split(",")]
    seen, gaps, cal, speeds = [], [], [], []

    def dilation(speed: dict) -> float:
        """What a block's time is multiplied by: its machine speed with --speed-blocks, else 1."""
        return speed["factor"] if args.speed_blocks else 1.0

    # Prefill and decode steps come by the thousand from chunked and disaggregated; mixed steps mostly from planned's
    # inlines (at a calibration rate a chunked worker rarely holds decodes when a prompt arrives).
    for cal_policy, cal_cluster in (("chunked", "2C"), ("disaggregated", "1P1D"), ("planned", "1P1M")):
        # Predicted with the profile as given (no running recalibration): the ratios measured are to it.
        text = policy_text(cal_policy, argparse.Namespace(**{**vars(args), "recalibrate_steps": 0}))
        llm = LLM(None, cluster=cal_cluster, policy=text, profile=measured, progress=False, **ENGINE)
        if cal_cluster == "1P1D":  # the handoff the cluster really makes, timed on its own workers
            transfer = llm.engine.measure_handoff(raw.kv_bytes_per_token)
        part = StepWatch(llm.engine)
        if not speeds:  # the machine's speed as the calibration starts (and as it ends, below)
            speeds.append(machine_speed(first_worker(llm), raw, slo_batch(cfg)))
        llm.engine.start()
        try:
            rate = args.calibrate_rate or (float(np.median(given)) if given else round(0.12 * sim_goodput(
                poisson, cal_cluster, engine_policy(text, cfg), raw, raw, tpot_slo, 0.5, 4.0)[0], 2))
            reqs = scaled_requests(poisson, max(16, round(rate * args.calibrate)), rate, 99, raw, tpot_slo,
                                   dilation(speeds[0]))
            run_real(llm.engine, reqs, tqdm(desc=f"calibration run {cal_policy} {cal_cluster}", total=0))
        finally:
            llm.engine.stop()
        seen += part
        gaps += part.gaps
        cal.append({"policy": cal_policy, "cluster": cal_cluster, "arrival": "poisson", "rate": rate,
                    "requests": len(reqs), "steps": {k: sum(x[0] == k for x in part) for k in KINDS},
                    "steps_beside_another": {k: sum(x[0] == k and x[3] for x in part) for k in KINDS}})
    speeds.append(machine_speed(first_worker(llm), raw, slo_batch(cfg)))
    cal_speed = float(np.sqrt(speeds[0]["factor"] * speeds[1]["factor"]))
    profile, factors, gap_ms = calibrated_profile(raw, seen, gaps, transfer)
    cost = CostModel.from_json(profile)
    # With speed blocks, time is counted at the profile's speed: the calibrated profile without the machine's
    # speed during the calibration (what remains is the cluster's contention and host time), dilated below by
    # each block's own speed.
    nominal = cost.scaled(dict.fromkeys(KINDS, 1 / cal_speed)) if args.speed_blocks else cost

    # The simulator's goodput on the measured profile picks the rates the real engine is run at.
    sim_gp = {}
    for name, cluster in tqdm(chosen, desc="simulator goodput", unit="policy"):
        sim_gp[name] = sim_goodput(args, cluster, engine_policy(policy_text(name, args), cfg), nominal, raw, tpot_slo,
                                   0.5, 4.0)
    if args.rates == "auto":
        # Centred below the simulated goodputs: the real engine fell short of them at high load in past runs
        # (on two shared cores the P -> D handoff path costs P throughput the simulator does not charge).
        lo = 0.4 * min(g for g, _ in sim_gp.values() if g > 0)
        hi = 0.9 * max(g for g, _ in sim_gp.values())
        rates = [round(float(x), 2) for x in np.geomspace(lo, hi, args.num_rates)]
    else:
        rates = given
    sim_windows = {name: sim_window_curves(args, cluster, engine_policy(policy_text(name, args), cfg), nominal, raw,
                                           tpot_slo, rates)
                   for name, cluster in tqdm(chosen, desc="simulator on the real runs' windows", unit="policy")}

    out = {"benchmark": "bench.engine_slo", "machine": machine(), "command": command_line("bench.engine_slo"),
           "model": "embedded default (checkpoints/default)", "engine": ENGINE,
           "profile": {"measured": str(profile_path), "reused_from_cache": reused, "measured_profile": measured,
                       "measured_coefficients_ms": {"prefill": raw.prefill, "decode": raw.decode, "mixed": raw.mixed},
                       "measured_points": {k: measured[k] for k in ("prefill", "decode", "mixed") if k in measured},
                       "calibration": {"runs": cal, "real_over_predicted_median": factors,
                                       "host_gap_after_step_ms_mean": gap_ms,
                                       "machine_speed_start_end": speeds, "machine_speed": cal_speed},
                       "transfer_measured": transfer,
                       "used": profile},
           "workload": {"trace": args.workload, "arrival": f"{args.arrival}{f' cv {args.cv}' if args.arrival == 'gamma' else ''} (open loop, real clock)",
                        "input_scale": args.input_scale, "output_scale": args.output_scale,
                        "input_cap": ENGINE["max_model_len"] - args.max_output_len - 1,
                        "output_cap": args.max_output_len, "seconds_of_arrivals_per_run": args.duration,
                        "seeds_per_rate": args.seeds, "first_seed": args.first_seed},
           "slo": {"ttft": f"{args.ttft_scale} x the request's isolated prefill time (measured profile)",
                   "tpot_s": tpot_slo,
                   "tpot": f"{args.tpot_scale} x the measured decode step at batch {slo_batch(cfg)} "
                           f"({step * 1e3:.2f} ms)"},
           "prefill_packing": f"up to {args.prefill_seqs} prompts a step on P workers and under colocated/chunked "
                              f"(max_prefill_seqs)",
           "shed": "every policy rejects hopeless requests at once (counted as misses)" if args.shed else "none",
           "speed_blocks": ("time at the profile's speed: each seed x rate block's arrival times, SLOs and profiles x "
                            "its dilation, the machine's speed timed before it (calibration.machine_speed: real / "
                            "profiled step); rates and goodputs are nominal (req/s at the profile's speed)"
                            if args.speed_blocks else "off: speeds recorded, nothing dilated"),
           "target": args.target, "rates": rates, "policies": {}}

    # Interleaved: at each seed and rate every policy runs, one after another (their order rotating), before the
    # next rate; the machine's speed drifts by tens of percent over minutes on these VMs, and this way it falls on
    # every policy alike. With --speed-blocks each such block's time is also dilated by the machine's speed
    # measured just before it.
    engines, results = {}, {}
    for name, cluster in chosen:
        llm = LLM(None, cluster=cluster, policy=policy_text(name, args), profile=profile, progress=False, **ENGINE)
        policy = engine_policy(policy_text(name, args), cfg)
        assert llm.engine.policy == policy, (llm.engine.policy, policy)
        # Steps against the profile as measured, whatever the policy planned with (planned recalibrates).
        engines[name] = (llm, StepWatch(llm.engine, reference=raw), policy)
        results[name] = [{"real": [], "sim": [], "sim_raw": [], "sim_run_speed": [], "steps": [], "gaps": [],
                          "per_seed": []} for _ in rates]
    bar = tqdm(total=args.seeds * len(chosen) * len(rates), desc="real engine runs", unit="run")
    block = 0
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for i, rate in enumerate(rates):
            speed = machine_speed(first_worker(engines[chosen[0][0]][0]), raw, slo_batch(cfg))
            d = dilation(speed)
            planned_with, sim_raw = (m.scaled(dict.fromkeys(KINDS, d)) for m in (nominal, raw))
            k = block % len(chosen)
            block += 1
            for name, cluster in chosen[k:] + chosen[:k]:
                llm, seen, policy = engines[name]
                eng = llm.engine
                if args.speed_blocks:
                    eng.scheduler.set_profile(planned_with)
                bar.set_description(f"seed {seed}: real {name} on {cluster} at {rate} req/s (x {d:.2f})")
                seen.clear()
                reqs = run_requests(args, seed, i, rate, raw, tpot_slo, d)
                eng.start()
                try:
                    done = run_real(eng, reqs, bar)
                finally:
                    eng.stop()
                assert all(w.alloc.num_used == 0 for w in eng.scheduler.workers.values()), "pages left in use"
                acc = results[name][i]
                acc["real"] += done
                acc["sim"] += replay(done, cluster, policy, planned_with, cfg.page_size)
                # The same replay with the profile as measured (uncalibrated): what the simulator alone says.
                acc["sim_raw"] += replay(done, cluster, policy, sim_raw, cfg.page_size)
                # And calibrated on this run's own steps: the simulator given the speed the machine ran at
                # meanwhile (a diagnostic: what is left is the simulator's error, not the machine's drift).
                own = CostModel.from_json(calibrated_profile(raw, seen, seen.gaps, transfer)[0])
                acc["sim_run_speed"] += replay(done, cluster, policy, own, cfg.page_size)
                acc["steps"] += seen
                acc["gaps"] += seen.gaps
                acc["per_seed"].append({"seed": seed, "attainment": summarize(done)["attainment"],
                                        "machine_speed": speed, "dilation": d, "actual_rate": rate / d})
                bar.update()
    bar.close()

    for name, cluster in chosen:
        runs = []
        for rate, acc in zip(rates, results[name]):  # pooled over the seeds
            rs, ss, su = summarize(acc["real"]), summarize(acc["sim"]), summarize(acc["sim_raw"])
            so = summarize(acc["sim_run_speed"])
            runs.append({"rate": rate, "requests": len(acc["real"]), "per_seed": acc["per_seed"],
                         "step_real_over_measured_profile": {k: step_ratio(acc["steps"], k) for k in KINDS},
                         "sim_replay_run_speed": p90s(so),
                         "rel_error_run_speed": {k: rel_err(so[k], rs[k]) for k in ERROR_KEYS},
                         "host_gap_after_step_ms_mean": mean_gaps_ms(acc["gaps"]),
                         "real": p90s(rs), "sim_replay": p90s(ss), "sim_replay_uncalibrated": p90s(su),
                         "rel_error": {k: rel_err(ss[k], rs[k]) for k in ERROR_KEYS},
                         "rel_error_uncalibrated": {k: rel_err(su[k], rs[k]) for k in ERROR_KEYS}})
        out["policies"][name] = {"cluster": cluster, "runs": runs, "goodput_sim": sim_gp[name][0],
                                 "sim_curve": sim_gp[name][1],
                                 "sim_window_curves": {str(s): [a for _, a in c] for s, c in sim_windows[name].items()}}
    summarize_result(out)
    out["machine"]["load_average_end"] = os.getloadavg()
    out["wall_s"] = round(time.time() - t_start, 1)
    save(out, Path(args.out))
    return 0

