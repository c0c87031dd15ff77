"""The real cluster engine against its SLOs on this machine, every policy, with the simulator beside it.

    python -m bench.engine_slo --help             the real runs (run.py), with the simulator's replays of them
    python -m bench.engine_slo.pool --help        several runs of one workload on other seeds, pooled
    python -m bench.engine_slo.workloads --help   the simulator alone over scaled workloads: where a win is predicted

sim.py is the workload and the simulator's side, report.py the goodputs, pairing and plots, calibration.py the
profile calibrated to the steps as the cluster runs them.
"""
