"""bench.engine_slo.calibration.calibrate: per-kind step factors and the contention, from hand-made step records.

Records are (kind, real s, predicted s, started beside another worker's step)."""

import pytest

from bench.engine_slo import calibration as step_calibration


def steps(kind, n, ratio, shared):
    return [(kind, ratio * 0.004, 0.004, shared)] * n


def test_a_kind_that_rarely_runs_alone_is_taken_from_its_shared_steps_over_the_contention():
    seen = (steps("decode", 100, 2.0, False) + steps("decode", 40, 3.0, True)
            + steps("prefill", 30, 1.5, False)
            # inlines mostly run while the other worker is busy: 5 alone (noise), 30 beside another at 2.7
            + steps("mixed", 5, 9.9, False) + steps("mixed", 30, 2.7, True))
    factors, shared = step_calibration.calibrate(seen)
    assert shared == pytest.approx(1.5)  # decodes beside another ran 3.0 / 2.0 of their alone factor
    assert factors["decode"] == pytest.approx(2.0)
    assert factors["prefill"] == pytest.approx(1.5)
    assert factors["mixed"] == pytest.approx(2.7 / 1.5)  # not the overall (decode-dominated) 2.0, not the 5 alone


def test_a_kind_with_too_few_steps_anywhere_takes_the_median_of_all_alone_steps():
    seen = (steps("decode", 100, 2.0, False) + steps("decode", 40, 3.0, True)
            + steps("prefill", 30, 1.5, False) + steps("mixed", 5, 9.9, False) + steps("mixed", 5, 9.9, True))
    factors, shared = step_calibration.calibrate(seen)
    assert shared == pytest.approx(1.5)
    assert factors["mixed"] == pytest.approx(2.0)  # the median of the 135 alone steps


def test_with_no_kind_alone_often_enough_every_kind_takes_the_median_of_all_steps_and_no_contention():
    # 10 alone at 2.0 and 11 beside another at 4.0: the median of all 21 is 4.0
    seen = steps("decode", 10, 2.0, False) + steps("prefill", 5, 4.0, True) + steps("mixed", 6, 4.0, True)
    factors, shared = step_calibration.calibrate(seen)
    assert shared == 1.0
    assert factors == {"prefill": pytest.approx(4.0), "decode": pytest.approx(4.0), "mixed": pytest.approx(4.0)}
