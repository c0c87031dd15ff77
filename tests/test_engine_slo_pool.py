"""bench.engine_slo.pool: runs of one workload on other seeds joined into one report, on hand-made results."""

import copy

import pytest

from bench.engine_slo import pool as engine_slo_pool

RATES = [4.0, 8.0, 12.0]


def result(planned: dict, disaggregated: dict, within: dict, replayed: dict, requests: int, rates=RATES) -> dict:
    """A bench.engine_slo result as the pool reads it; planned / disaggregated: seed -> attainment at each rate;
    replayed: policy -> the simulator's replay attainment at each rate, over `requests` requests a rate."""
    def policy(name, cluster, per_seed):
        return {"cluster": cluster, "goodput_sim": 10.0, "runs": [
            {"rate": rate, "per_seed": [{"seed": s, "attainment": a[i]} for s, a in per_seed.items()],
             "requests": requests, "sim_replay": {"attainment": replayed[name][i]},
             "rel_error": {"ttft_p90": 0.1, "tpot_p90": -0.3, "attainment": 0.0}} for i, rate in enumerate(rates)]}

    command = (f"python -m bench.engine_slo --arrival gamma --seeds 1 --first-seed={min(planned)} "
               f"--rates {','.join(map(str, rates))} --out x.json")
    return {"command": command, "machine": {"cpus": 2}, "slo": {"ttft": "10 x", "tpot_s": 0.036}, "target": 0.9,
            "rates": rates,
            "prefill_packing": "8", "shed": "all", "speed_blocks": "off", "engine": {"page_size": 16},
            "workload": {"trace": "mooncake-conversation", "arrival": "gamma cv 2", "input_scale": 1 / 64,
                         "output_scale": 1 / 16, "input_cap": 463, "output_cap": 48,
                         "seconds_of_arrivals_per_run": 16, "first_seed": min(planned)},
            "policies": {"planned": policy("planned", "1P1M", planned),
                         "disaggregated": policy("disaggregated", "1P1D", disaggregated)},
            "summary": {"within_25pct": within, "runs": 2 * len(RATES)}}


def two_runs():
    a = result({0: [1.0, 0.95, 0.85]}, {0: [0.95, 0.80, 0.7]}, {"ttft_p90": 6, "tpot_p90": 0, "attainment": 6},
               {"planned": [1.0, 0.9, 0.8], "disaggregated": [0.9, 0.8, 0.7]}, 10)
    b = result({1: [1.0, 0.95, 0.75]}, {1: [0.87, 0.90, 0.7]}, {"ttft_p90": 5, "tpot_p90": 1, "attainment": 6},
               {"planned": [0.96, 0.94, 0.8], "disaggregated": [0.94, 0.8, 0.7]}, 30)
    return a, b


def test_pool_joins_the_seeds_of_both_runs_and_reads_the_goodput_off_their_mean_curve():
    a, b = two_runs()
    out = engine_slo_pool.pool([a, b], ["a.json", "b.json"])
    assert out["seeds"] == [0, 1]
    planned, disagg = out["policies"]["planned"], out["policies"]["disaggregated"]
    assert planned["attainment_seed_mean"] == pytest.approx([1.0, 0.95, 0.80])
    # planned meets 0.9 at 8 and crosses toward 12 at 8 + 4 x 0.05 / 0.15; disaggregated 0.91 at 4, 0.85 at 8:
    # 4 + 4 x 0.01 / 0.06
    assert disagg["attainment_seed_mean"] == pytest.approx([0.91, 0.85, 0.7])
    assert planned["goodput_real"] == pytest.approx(8 + 4 * 0.05 / 0.15)
    assert disagg["goodput_real"] == pytest.approx(4 + 4 * 0.01 / 0.06)
    pair = out["summary"]["paired"]["planned vs disaggregated"]
    # differences: seed 0: 0.05, 0.15, 0.15; seed 1: 0.13, 0.05, 0.05
    assert pair["wins_ties_losses"] == [6, 0, 0]
    assert pair["attainment_diff_mean"] == pytest.approx(0.58 / 6)
    assert set(pair["goodput_per_seed"]) == {"0", "1"}
    assert pair["goodput_ratio_over_seeds"]["ratio"] == pytest.approx((8 + 4 * 0.05 / 0.15) / (4 + 4 * 0.01 / 0.06))
    # The replays, weighted 10 : 30 by requests: planned 0.97, 0.93, 0.8 -> 8 + 4 x 0.03 / 0.13; disaggregated
    # 0.93, 0.8, 0.7 -> 4 + 4 x 0.03 / 0.13
    assert planned["attainment_sim_replay"] == pytest.approx([0.97, 0.93, 0.8])
    assert out["summary"]["goodput_ratio_real_vs_sim_replay"]["planned vs disaggregated"] == pytest.approx(
        [(8 + 4 * 0.05 / 0.15) / (4 + 4 * 0.01 / 0.06), (8 + 4 * 0.03 / 0.13) / (4 + 4 * 0.03 / 0.13)])
    assert out["summary"]["sim_within_25pct"] == {"ttft_p90": 11, "tpot_p90": 1, "attainment": 12}
    assert out["summary"]["sim_points"] == 12


def test_runs_at_other_rates_pool_at_the_rates_they_share():
    a, b = two_runs()
    wider = result({2: [0.3, 1.0, 0.95, 0.8]}, {2: [0.3, 0.95, 0.85, 0.6]}, {"ttft_p90": 8, "tpot_p90": 8,
                   "attainment": 8}, {"planned": [0.3, 1.0, 0.9, 0.8], "disaggregated": [0.3, 0.9, 0.8, 0.6]}, 20,
                   rates=[2.0, *RATES])
    out = engine_slo_pool.pool([a, b, wider], ["a", "b", "wider"])
    assert out["rates"] == RATES and out["rates_left_out"] == {"a": [], "b": [], "wider": [2.0]}
    # planned's seeds at 4, 8, 12: (1.0, 1.0, 1.0), (0.95, 0.95, 0.95), (0.85, 0.75, 0.8)
    assert out["policies"]["planned"]["attainment_seed_mean"] == pytest.approx([1.0, 0.95, 0.8])
    assert out["seeds"] == [0, 1, 2]
    assert out["summary"]["paired"]["planned vs disaggregated"]["wins_ties_losses"] == [9, 0, 0]
    apart = result({3: [0.9, 0.8]}, {3: [0.9, 0.8]}, {"ttft_p90": 4, "tpot_p90": 4, "attainment": 4},
                   {"planned": [0.9, 0.8], "disaggregated": [0.9, 0.8]}, 20, rates=[12.0, 16.0])
    with pytest.raises(ValueError, match="fewer than two rates"):
        engine_slo_pool.pool([a, apart], ["a", "apart"])


def test_pool_refuses_runs_of_another_workload_or_sharing_a_seed():
    a, b = two_runs()
    other_slo = copy.deepcopy(b)
    other_slo["slo"]["tpot_s"] = 0.047  # another measured profile: another workload
    with pytest.raises(ValueError, match="'slo'"):
        engine_slo_pool.pool([a, other_slo], ["a", "b"])
    longer = copy.deepcopy(b)
    longer["workload"]["seconds_of_arrivals_per_run"] = 32
    with pytest.raises(ValueError, match="seconds_of_arrivals_per_run"):
        engine_slo_pool.pool([a, longer], ["a", "b"])
    other_policy = copy.deepcopy(b)
    other_policy["command"] += " --handoff-guard"
    with pytest.raises(ValueError, match="options"):
        engine_slo_pool.pool([a, other_policy], ["a", "b"])
    reprofiled = copy.deepcopy(b)
    reprofiled["command"] = reprofiled["command"].replace("--seeds 1", "--reprofile --seeds 3")
    assert engine_slo_pool.pool([a, reprofiled], ["a", "b"])["seeds"] == [0, 1]
    as_script = copy.deepcopy(b)  # a run started as `python bench/engine_slo/__main__.py ...`: the same options
    as_script["command"] = as_script["command"].replace("python -m bench.engine_slo", "bench/engine_slo/__main__.py")
    assert engine_slo_pool.pool([a, as_script], ["a", "b"])["seeds"] == [0, 1]
    with pytest.raises(ValueError, match="seed 0 is in run 0 and run 1"):
        engine_slo_pool.pool([a, copy.deepcopy(a)], ["a", "a again"])


def test_pool_writes_its_report_and_plot(tmp_path):
    import json

    a, b = two_runs()
    files = []
    for name, out in (("a.json", a), ("b.json", b)):
        (tmp_path / name).write_text(json.dumps(out))
        files.append(str(tmp_path / name))
    assert engine_slo_pool.main([*files, "--out", str(tmp_path / "pool.json")]) == 0
    written = json.loads((tmp_path / "pool.json").read_text())
    assert written["sources"] == files and written["policies"]["planned"]["goodput_real_label"] == "9.33"
    assert (tmp_path / "pool.png").stat().st_size > 10_000
