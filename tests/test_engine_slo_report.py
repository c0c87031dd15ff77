"""bench.engine_slo.report.paired: ours against each baseline seed by seed, on hand-made curves."""

import pytest

from bench.engine_slo import report

RATES = [4.0, 8.0, 12.0]


def policy(per_seed_attainment: dict) -> dict:
    """per_seed_attainment: seed -> attainment at each of RATES."""
    return {"runs": [{"rate": rate, "per_seed": [{"seed": s, "attainment": a[i]} for s, a in per_seed_attainment.items()]}
                     for i, rate in enumerate(RATES)]}


def test_paired_counts_every_seed_and_rate_and_reads_each_seeds_goodput():
    out = {"rates": RATES, "target": 0.9, "policies": {
        "planned": policy({0: [1.0, 0.95, 0.85], 1: [0.98, 0.9, 0.7]}),
        "chunked": policy({0: [0.95, 0.80, 0.85], 1: [0.99, 0.6, 0.5]}),
        "disaggregated": policy({0: [0.8, 0.7, 0.6], 1: [0.85, 0.8, 0.6]})}}
    got = report.paired(out)
    assert set(got) == {"planned vs chunked", "planned vs disaggregated"}
    vs_chunked = got["planned vs chunked"]
    # differences 0.05, 0.15, 0.0 (seed 0) and -0.01, 0.3, 0.2 (seed 1)
    assert vs_chunked["attainment_diff_mean"] == pytest.approx((0.05 + 0.15 + 0.0 - 0.01 + 0.3 + 0.2) / 6)
    assert vs_chunked["wins_ties_losses"] == [4, 1, 1]
    # seed 0: planned meets 0.9 up to 8 and crosses toward 12 at 8 + 4 x 0.05 / 0.10 = 10; chunked meets it at 4
    # only, crossing toward 8 at 4 + 4 x 0.05 / 0.15. Seed 1: planned exactly 0.9 at 8 -> 8 + 0; chunked 4 + 4 x 0.09 / 0.39.
    assert vs_chunked["goodput_per_seed"] == {"0": ["10.00", f"{4 + 4 * 0.05 / 0.15:.2f}"],
                                              "1": ["8.00", f"{4 + 4 * 0.09 / 0.39:.2f}"]}
    assert got["planned vs disaggregated"]["wins_ties_losses"] == [6, 0, 0]
    assert got["planned vs disaggregated"]["goodput_per_seed"]["0"][1] == "<4.0"


def test_runs_without_per_seed_records_give_no_pairs():
    out = {"rates": RATES, "target": 0.9, "policies": {
        "planned": {"runs": [{"rate": r} for r in RATES]}, "chunked": {"runs": [{"rate": r} for r in RATES]}}}
    assert report.paired(out) == {}


def test_ratio_spread_over_seeds_on_hand_made_curves():
    # Identical seeds: every redraw is the same curve, so the spread collapses onto the ratio. Planned crosses
    # 0.9 at 8 + 4 x 0.05 / 0.10 = 10, disaggregated at 4 + 4 x 0.05 / 0.15 = 16 / 3: ratio 1.875.
    same = {"rates": RATES, "target": 0.9, "policies": {
        "planned": policy({0: [1.0, 0.95, 0.85], 1: [1.0, 0.95, 0.85]}),
        "disaggregated": policy({0: [0.95, 0.80, 0.7], 1: [0.95, 0.80, 0.7]})}}
    spread = report.paired(same)["planned vs disaggregated"]["goodput_ratio_over_seeds"]
    assert spread["ratio"] == pytest.approx(1.875)
    assert spread["p05"] == spread["p50"] == spread["p95"] == pytest.approx(1.875)
    assert spread["undetermined"] == 0
    # Seed 1 alone would give planned 8 + 4 x 0.05 / 0.25 = 8.8 against a baseline missing every rate (taken as
    # 4: 2.2x); seed 0 alone 10 / (16 / 3) = 1.875; both (half the redraws) the ratio of the mean curves.
    mixed = {"rates": RATES, "target": 0.9, "policies": {
        "planned": policy({0: [1.0, 0.95, 0.85], 1: [1.0, 0.95, 0.7]}),
        "disaggregated": policy({0: [0.95, 0.80, 0.7], 1: [0.85, 0.80, 0.7]})}}
    spread = report.paired(mixed)["planned vs disaggregated"]["goodput_ratio_over_seeds"]
    # the mean curves: planned 1.0, 0.95, 0.775 -> 8 + 4 x 0.05 / 0.175; disaggregated 0.9 at 4 -> 4 + 0
    assert spread["ratio"] == pytest.approx((8 + 4 * 0.05 / 0.175) / 4)
    assert spread["p05"] == pytest.approx(1.875)
    assert spread["p95"] == pytest.approx(spread["ratio"])
    # A baseline meeting every rate bounds nothing: those redraws are counted, not taken as ratios.
    top = {"rates": RATES, "target": 0.9, "policies": {
        "planned": policy({0: [1.0, 1.0, 1.0]}), "disaggregated": policy({0: [1.0, 1.0, 0.95]})}}
    spread = report.paired(top)["planned vs disaggregated"]["goodput_ratio_over_seeds"]
    assert spread["ratio"] is None and spread["undetermined"] == spread["draws"] and "p50" not in spread
    # Both missing every rate: nothing is known of the ratio either. Ours alone missing them all: at most 0x.
    low = {"rates": RATES, "target": 0.9, "policies": {
        "planned": policy({0: [0.8, 0.7, 0.6]}), "disaggregated": policy({0: [0.85, 0.7, 0.6]})}}
    spread = report.paired(low)["planned vs disaggregated"]["goodput_ratio_over_seeds"]
    assert spread["ratio"] is None and spread["undetermined"] == spread["draws"]
    low["policies"]["disaggregated"] = policy({0: [0.95, 0.7, 0.6]})
    spread = report.paired(low)["planned vs disaggregated"]["goodput_ratio_over_seeds"]
    assert spread["ratio"] == 0.0 and spread["p95"] == 0.0


def test_the_simulators_runs_on_other_seeds_give_the_ratio_to_expect_and_its_spread_for_a_run_of_as_many():
    out = {"rates": RATES, "target": 0.9, "policies": {
        "planned": policy({0: [1.0, 0.95, 0.85], 1: [1.0, 0.95, 0.7]}),
        "disaggregated": policy({0: [0.95, 0.80, 0.7], 1: [0.85, 0.80, 0.7]})}}
    # Simulated seeds 1000-1003: two like real seed 0 (planned 10, disaggregated 16 / 3: 1.875x), two where
    # planned crosses at 8 + 4 x 0.05 / 0.25 = 8.8 and disaggregated at 4 + 4 x 0.05 / 0.15 = 16 / 3 (1.65x).
    out["policies"]["planned"]["sim_window_curves"] = {
        "1000": [1.0, 0.95, 0.85], "1001": [1.0, 0.95, 0.85], "1002": [1.0, 0.95, 0.7], "1003": [1.0, 0.95, 0.7]}
    out["policies"]["disaggregated"]["sim_window_curves"] = {s: [0.95, 0.80, 0.7] for s in ("1000", "1001", "1002",
                                                                                              "1003")}
    sims = report.paired(out)["planned vs disaggregated"]["sim_windows"]
    assert sims["seeds"] == 4
    # all four: planned's mean curve 1.0, 0.95, 0.775 -> 8 + 4 x 0.05 / 0.175
    assert sims["over_all_seeds"]["ratio"] == pytest.approx((8 + 4 * 0.05 / 0.175) / (16 / 3))
    two = sims["runs_of_2_seeds"]  # the real run had two seeds: pairs of simulated ones
    assert two["undetermined"] == 0
    assert two["p05"] == pytest.approx(8.8 / (16 / 3)) and two["p95"] == pytest.approx(1.875)
    assert two["p50"] == pytest.approx((8 + 4 * 0.05 / 0.175) / (16 / 3))  # one of each: 4 of the 6 pairs
    del out["policies"]["disaggregated"]["sim_window_curves"]
    assert "sim_windows" not in report.paired(out)["planned vs disaggregated"]
