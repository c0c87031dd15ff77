"""--jax-distributed (tropical_jax/cluster/distributed.py): what each mode sets or calls, without TPUs."""

import jax
import pytest

from tropical_jax.cluster import distributed


@pytest.fixture
def calls(monkeypatch):
    seen = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: seen.append(kw))
    return seen


def test_off_does_nothing(calls):
    env = {}
    assert distributed.initialize(None, env) == {} and env == {"TROPICAL_JAX_DISTRIBUTED": "off"}
    assert calls == []


def test_host_confines_a_ray_actor_to_its_chips(calls):
    # Ray gave this actor chips 4-7 of an 8-chip host (and, as older Ray does, the old bound names).
    env = {"TPU_VISIBLE_CHIPS": "4,5,6,7", "TPU_HOST_BOUNDS": "1,1,1", "TROPICAL_JAX_DISTRIBUTED": "host"}
    distributed.initialize(None, env)
    assert env == {"TROPICAL_JAX_DISTRIBUTED": "host", "TPU_VISIBLE_CHIPS": "4,5,6,7",
                   "TPU_PROCESS_BOUNDS": "1,1,1", "TPU_CHIPS_PER_PROCESS_BOUNDS": "2,2,1",
                   "TPU_PROCESS_PORT": "8480", "TPU_PROCESS_ADDRESSES": "localhost:8480",
                   "CLOUD_TPU_TASK_ID": "0", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    assert calls == []  # never joins the slice-wide runtime


def test_host_mode_bounds_and_distinct_ports():
    assert distributed.host_local_tpu_env([0])["TPU_CHIPS_PER_PROCESS_BOUNDS"] == "1,1,1"
    assert distributed.host_local_tpu_env([2, 3])["TPU_CHIPS_PER_PROCESS_BOUNDS"] == "1,2,1"
    assert distributed.host_local_tpu_env(list(range(8)))["TPU_CHIPS_PER_PROCESS_BOUNDS"] == "2,4,1"
    ports = {distributed.host_local_tpu_env(c)["TPU_PROCESS_PORT"] for c in ([0, 1], [2, 3], [4, 5], [6, 7])}
    assert len(ports) == 4
    with pytest.raises(ValueError, match="1, 2, 4 or 8 chips"):
        distributed.host_local_tpu_env([0, 1, 2])


def test_host_mode_off_a_tpu_host_changes_nothing(monkeypatch):
    monkeypatch.setattr(distributed.glob, "glob", lambda pattern: [])
    env = {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert distributed.initialize("host", env) == {}
    assert env == {"CUDA_VISIBLE_DEVICES": "0,1", "TROPICAL_JAX_DISTRIBUTED": "host"}


def test_host_mode_takes_every_chip_of_the_host_when_ray_set_none(monkeypatch):
    monkeypatch.setattr(distributed.glob, "glob",
                        lambda pattern: [f"/dev/accel{i}" for i in range(4)] if pattern == "/dev/accel*" else [])
    env = {}
    distributed.initialize("host", env)
    assert env["TPU_VISIBLE_CHIPS"] == "0,1,2,3" and env["TPU_CHIPS_PER_PROCESS_BOUNDS"] == "2,2,1"


def test_slice_auto_detects(calls):
    assert distributed.initialize("slice", {}) == {}
    assert calls == [{}]  # jax finds coordinator, process count and id from Cloud TPU metadata


def test_slice_with_explicit_processes(calls):
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:8482", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    distributed.initialize("slice", env)
    assert calls == [{"coordinator_address": "10.0.0.2:8482", "num_processes": 4, "process_id": 3}]


def test_unknown_mode(calls):
    with pytest.raises(ValueError, match="--jax-distributed"):
        distributed.initialize("auto", {})


def test_serve_flag():
    from tropical_jax.serve import parse_args

    assert parse_args([]).jax_distributed == "off"
    assert parse_args(["--jax-distributed", "host"]).jax_distributed == "host"
    with pytest.raises(SystemExit):
        parse_args(["--jax-distributed", "auto"])
