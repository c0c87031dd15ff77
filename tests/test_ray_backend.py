"""The Ray backend: cluster workers as local Ray actors, driven by the same scheduler and loops, give
the single in-process worker's tokens; KV pages move between the actors as host arrays."""

import os
import sys

import pytest

from test_cluster_engine import ENGINE, SP, make_setup, profile
from tropical_jax import LLM
from tropical_jax.cluster.ray_backend import actor_options, actor_platform, import_ray


# One decode bucket: three executables per worker (chunk, decode, mixed), so actors warm up fast.
ENGINE = dict(ENGINE, batch_buckets=[4])


@pytest.fixture(scope="module")
def ray():
    ray = pytest.importorskip("ray")
    # A shared 2-core machine: few Ray processes, no dashboard; the actors reserve no CPUs.
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def setup(ray, tmp_path_factory):  # Ray first: it starts its processes before JAX starts threads here
    return make_setup(tmp_path_factory, ENGINE)


@pytest.fixture(scope="module")
def llm(setup, ray):
    llm = LLM(setup[0], cluster="1P1M", policy="tropical", profile=profile(), backend="ray", **ENGINE)
    yield llm
    llm.engine.close()


@pytest.mark.slow
@pytest.mark.ray
def test_two_actors_give_the_single_worker_tokens(setup, llm):
    _, prompts, ref = setup
    where = {name: w.where() for name, w in llm.engine.workers.items()}
    pids = {w["pid"] for w in where.values()}
    assert len(pids) == 2 and os.getpid() not in pids  # each worker in its own process
    assert all(len(w["devices"]) == 1 for w in where.values())
    assert llm.engine_config.bucket_set == "coarse"  # a CPU-only Ray cluster's actors run on CPU
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=SP)
    assert [o.token_ids for o in outs] == ref
    c = llm.engine.scheduler.counters
    assert c["transfers"] >= 1 and c["transfer_failures"] == 0  # prefills ran on P0 and moved their KV to M0
    assert llm.engine.pages_used() == 0


@pytest.mark.slow
@pytest.mark.ray
def test_a_failed_actor_to_actor_copy_recomputes_on_the_decode_worker(setup, llm, monkeypatch):
    _, prompts, ref = setup
    p0 = llm.engine.workers["P0"]
    # The source actor raises while reading; the destination's write sees the failed object ref.
    monkeypatch.setattr(p0, "read_pages", lambda pages: p0.actor.read_pages.remote(None))
    before = dict(llm.engine.scheduler.counters)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=SP)
    assert [o.token_ids for o in outs] == ref
    c = llm.engine.scheduler.counters
    failures = c["transfer_failures"] - before.get("transfer_failures", 0)
    assert failures >= 1 and c["recomputes"] - before.get("recomputes", 0) == failures
    assert llm.engine.pages_used() == 0


@pytest.mark.slow
@pytest.mark.ray
def test_a_tensor_parallel_actor_beside_a_single_device_one(setup, ray):
    path, prompts, ref = setup
    llm = LLM(path, cluster="P:tp2,M:tp1", policy="tropical", profile=profile(), backend="ray", **ENGINE)
    try:
        assert [len(w.where()["devices"]) for w in llm.engine.workers.values()] == [2, 1]
        outs = llm.generate(prompt_token_ids=prompts[:3], sampling_params=SP)
        assert [o.token_ids for o in outs] == ref[:3]
        assert llm.engine.scheduler.counters["transfers"] >= 1 and llm.engine.pages_used() == 0
    finally:
        llm.engine.close()


def test_actor_options_give_each_actor_its_devices():
    cpu = actor_options(2, {"CPU": 2.0}, xla_flags="--xla_foo=1 --xla_force_host_platform_device_count=8")
    assert cpu["num_cpus"] == 0
    assert cpu["runtime_env"]["env_vars"] == {
        "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=2"}
    assert actor_options(4, {"CPU": 8.0, "GPU": 8.0}) == {"num_gpus": 4}
    assert actor_options(4, {"CPU": 8.0, "TPU": 4.0}) == {"resources": {"TPU": 4}}
    # The engine settles bucket_set "auto" by the platform the actors get, not the driver's.
    assert [actor_platform(r) for r in ({"CPU": 2.0}, {"CPU": 8.0, "GPU": 8.0}, {"TPU": 4.0})] == ["cpu", "gpu", "tpu"]


def test_clear_errors_without_ray_or_without_a_cluster(monkeypatch):
    with pytest.raises(ValueError, match="pass cluster="):
        LLM(None, backend="ray")
    with pytest.raises(ValueError, match="backend must be"):
        LLM(None, backend="threads")
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    with pytest.raises(ImportError, match=r"pip install 'tropical-jax\[ray\]'"):
        import_ray()


def test_serve_flags_choose_the_backend(capsys):
    from tropical_jax.serve import parse_args

    a = parse_args(["--cluster", "P:tp2,M:tp2", "--backend", "ray", "--ray-address", "auto"])
    assert (a.backend, a.ray_address) == ("ray", "auto")
    assert a.devices_needed == 1  # the actors bring their own devices; the server process needs none
    assert parse_args(["--cluster", "1P1M"]).backend == "local"
    for argv, message in [(["--backend", "ray"], "give --cluster"),
                          (["--cluster", "1P1M", "--ray-address", "auto"], "--ray-address needs --backend ray")]:
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert message in capsys.readouterr().err


def test_a_ray_the_engine_started_is_shut_down_with_it(monkeypatch):
    """connect() starts a local Ray only when none is up; disconnect() (Engine.close, the
    server's drain) shuts down only a Ray that connect() started, never the user's own."""
    from tropical_jax.cluster import ray_backend

    class FakeRay:
        def __init__(self, up):
            self.up, self.calls = up, []

        def is_initialized(self):
            return self.up

        def init(self, **kw):
            self.up = True
            self.calls.append("init")

        def shutdown(self):
            self.up = False
            self.calls.append("shutdown")

    users = FakeRay(up=True)
    monkeypatch.setattr(ray_backend, "import_ray", lambda: users)
    ray_backend.connect()
    ray_backend.disconnect()
    assert users.calls == [] and users.up  # the user's Ray stays up
    ours = FakeRay(up=False)
    monkeypatch.setattr(ray_backend, "import_ray", lambda: ours)
    ray_backend.connect()
    ray_backend.disconnect()
    ray_backend.disconnect()
    assert ours.calls == ["init", "shutdown"] and not ours.up
