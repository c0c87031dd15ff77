"""The layout chooser (tropical_jax/cluster/layout.py) and the TPU type table the deploy scripts use."""

import subprocess
import sys

import pytest

from tropical_jax.cluster.layout import choose_layout, main, min_tp_for_model, tp_sizes
from tropical_jax.cluster.tpu_types import tpu_slice
from tropical_jax.sched.config import parse_cluster

def _hosts(chips, platform):
    """Host sizes to try `chips` on: one host (up to 8 chips; TPU hosts hold 1, 4 or 8), or several
    hosts of 4 chips (TPU slices) or of 1, 2, 4 or 8 GPUs."""
    single = [chips] if chips <= 8 and (platform == "gpu" or chips in (1, 4, 8)) else []
    multi = (4,) if platform == "tpu" else (1, 2, 4, 8)
    return single + [h for h in multi if h < chips and chips % h == 0]


def _check(cluster, chips, per_host):
    spec = parse_cluster(cluster)
    assert sum(w.tp for w in spec.workers) == chips, cluster  # every chip used, none twice
    assert all(per_host % w.tp == 0 for w in spec.workers), cluster  # meshes tile one host
    assert len({w.tp for w in spec.workers}) == 1
    return spec


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_every_chip_count_1_to_256_gets_a_valid_layout(platform):
    for chips in range(1, 257):
        for per_host in _hosts(chips, platform):
            spec = _check(choose_layout(chips, per_host, platform), chips, per_host)
            roles = {w.role for w in spec.workers}
            assert roles == ({"C"} if len(spec.workers) == 1 else {"P", "M"}), (chips, per_host, roles)
            if len(spec.workers) > 1:  # half prefill, the odd one multiplexing
                assert len(spec.by_role("P")) == len(spec.workers) // 2
            tp = spec.workers[0].tp
            default = 4 if platform == "tpu" else 2
            assert tp <= default and tp in tp_sizes(per_host, platform)
            if platform == "tpu":
                assert tp in (1, 2, 4, 8)


@pytest.mark.parametrize("chips,per_host,platform,expected", [
    (8, 8, "tpu", "P:tp4,M:tp4"),                      # v5e-8: the example
    (4, 4, "tpu", "P:tp2,M:tp2"),                      # v5e-4 / v4-8: two workers beat one at tp4
    (16, 4, "tpu", "P:tp4,P:tp4,M:tp4,M:tp4"),         # v5e-16: one worker per 4-chip host
    (1, 1, "tpu", "1C"),
    (8, 8, "gpu", "P:tp2,P:tp2,M:tp2,M:tp2"),          # 8 GPUs: 2P2M at TP2
    (2, 2, "gpu", "1P1M"),
    (1, 1, "gpu", "1C"),
    (16, 8, "gpu", ",".join(["P:tp2"] * 4 + ["M:tp2"] * 4)),
    (6, 6, "gpu", "P:tp2,M:tp2,M:tp2"),                # odd worker count: the extra one multiplexes
])
def test_defaults(chips, per_host, platform, expected):
    assert choose_layout(chips, per_host, platform) == expected


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_tp_override_on_a_v5e_8_host(tp):
    spec = _check(choose_layout(8, 8, "tpu", tp=tp, roles="C" if tp == 8 else None), 8, 8)
    assert {w.tp for w in spec.workers} == {tp}


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_tp_override_over_all_chip_counts_and_tp_sizes(platform):
    tried = 0
    for chips in range(1, 257):
        for per_host in _hosts(chips, platform):
            for tp in tp_sizes(per_host, platform):
                spec = _check(choose_layout(chips, per_host, platform, tp=tp), chips, per_host)
                assert {w.tp for w in spec.workers} == {tp}
                tried += 1
            for tp in (t for t in range(1, 17) if t not in tp_sizes(per_host, platform)):
                with pytest.raises(ValueError, match="never spans hosts|does not tile"):
                    choose_layout(chips, per_host, platform, tp=tp)
    assert tried > (500 if platform == "gpu" else 150)


def test_min_tp_raises_the_default():
    assert choose_layout(8, 8, "gpu", min_tp=3) == "P:tp4,M:tp4"   # next size that tiles the host
    assert choose_layout(8, 8, "tpu", min_tp=8) == "C:tp8"          # one worker is all that fits
    assert choose_layout(16, 8, "tpu", min_tp=8) == "P:tp8,M:tp8"
    assert min_tp_for_model(40 * 2**30, 16 * 2**30) == 5            # 40 GiB of weights on 16 GiB chips
    assert choose_layout(8, 8, "tpu", min_tp=min_tp_for_model(40 * 2**30, 16 * 2**30)) == "C:tp8"


def test_roles():
    assert choose_layout(4, 4, "gpu", roles="PD") == "P:tp2,D:tp2"
    assert choose_layout(4, 4, "gpu", roles="C") == "C:tp2,C:tp2"
    assert choose_layout(8, 8, "gpu", tp=1, roles="C") == "8C"


@pytest.mark.parametrize("kwargs,message", [
    (dict(chips=8, chips_per_host=4, platform="tpu", tp=8), "never spans hosts"),
    (dict(chips=8, chips_per_host=8, platform="gpu", tp=3), "does not tile"),
    (dict(chips=6, chips_per_host=6, platform="tpu", tp=3), "1, 2, 4 or 8"),
    (dict(chips=8, chips_per_host=8, platform="gpu", tp=0), "positive"),
    (dict(chips=0, chips_per_host=1, platform="gpu"), "at least one chip"),
    (dict(chips=10, chips_per_host=4, platform="gpu"), "do not fill hosts"),
    (dict(chips=8, chips_per_host=8, platform="gpu", tp=8, roles="PM"), "need two workers"),
    (dict(chips=1, chips_per_host=1, platform="gpu", roles="PM"), "need two workers"),
    (dict(chips=16, chips_per_host=4, platform="tpu", min_tp=8), "at most tp=4"),
    (dict(chips=8, chips_per_host=8, platform="gpu", tp=2, min_tp=4), "below"),
    (dict(chips=8, platform="fpga"), "unknown platform"),
    (dict(chips=8, platform="gpu", roles="PX"), "unknown roles"),
])
def test_impossible_requests_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        choose_layout(**kwargs)


@pytest.mark.parametrize("name,chips,per_host,gcloud_name", [
    ("v5e-8", 8, 8, "v5litepod-8"), ("v5litepod-16", 16, 4, "v5litepod-16"), ("v5litepod-1", 1, 1, "v5litepod-1"),
    ("v6e-8", 8, 8, "v6e-8"), ("v6e-256", 256, 4, "v6e-256"), ("v4-8", 4, 4, "v4-8"), ("v4-16", 8, 4, "v4-16"),
    ("v5p-8", 4, 4, "v5p-8"), ("V5P-32", 16, 4, "v5p-32"),
])
def test_tpu_types(name, chips, per_host, gcloud_name):
    s = tpu_slice(name)
    assert (s.chips, s.chips_per_host, s.accelerator_type) == (chips, per_host, gcloud_name)
    assert s.hosts == chips // per_host and s.runtime_version


@pytest.mark.parametrize("name", ["v9-8", "tpu", "v5e-12", "v6e-2", "v4-7", "v5p-9", "v5e-512", "a100-8"])
def test_unknown_tpu_types(name):
    with pytest.raises(ValueError, match="unknown TPU accelerator type|not a .* slice size"):
        tpu_slice(name)


def test_cli_env_format(capsys):
    assert main(["--accelerator-type", "v5e-16", "--format", "env"]) == 0
    env = dict(line.split("=", 1) for line in capsys.readouterr().out.split())
    assert env == {"ACCELERATOR_TYPE": "v5litepod-16", "RUNTIME_VERSION": "v2-alpha-tpuv5-lite", "CHIPS": "16",
                   "CHIPS_PER_HOST": "4", "HOSTS": "4", "TP": "4", "CLUSTER": "P:tp4,P:tp4,M:tp4,M:tp4"}


def test_cli_model_dir_raises_tp(tmp_path, capsys):
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 3000)
    # 3000 bytes of weights on "chips" of ~1000 bytes (half for weights): needs tp>=6 -> tp8.
    assert main(["--chips", "16", "--chips-per-host", "8", "--model-dir", str(tmp_path),
                 "--chip-gib", str(1000 / 2**30)]) == 0
    assert capsys.readouterr().out.strip() == "P:tp8,M:tp8"


def test_cli_errors_exit_2_with_a_message():
    r = subprocess.run([sys.executable, "-m", "tropical_jax.cluster.layout", "--accelerator-type", "v9-8"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown TPU accelerator type 'v9-8'" in r.stderr and not r.stdout
