"""`python -m tropical_jax.serve` options: config files (TOML or JSON), flags win, clear errors."""

import json

import pytest

from tropical_jax.serve import parse_args


def test_defaults_serve_the_embedded_model_on_loopback():
    a = parse_args([])
    assert (a.model, a.host, a.port, a.cluster) == (None, "127.0.0.1", 8000, None)
    # The single worker runs the shared scheduler too: chunked steps, hopeless requests shed.
    assert a.policy.policy == "chunked" and a.policy.shed and a.policy.max_prefill_seqs == a.max_prefill_seqs
    assert a.ttft_scale == 5.0 and a.tpot_slo_ms == 100.0 and a.api_key is None
    assert a.threads >= a.max_num_seqs + a.max_queue  # every admitted request gets a thread


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_config_file_sets_options_and_flags_win(tmp_path, suffix):
    path = tmp_path / f"serve{suffix}"
    options = {"port": 9001, "max-model-len": 512, "batch_buckets": [1, 4], "api_key": "k", "tpot_slo_ms": 50}
    if suffix == ".toml":
        path.write_text('port = 9001\n"max-model-len" = 512\nbatch_buckets = [1, 4]\napi_key = "k"\ntpot_slo_ms = 50\n')
    else:
        path.write_text(json.dumps(options))
    a = parse_args(["--config", str(path), "--port", "9002"])
    assert (a.port, a.max_model_len, a.batch_buckets, a.api_key, a.tpot_slo_ms) == (9002, 512, (1, 4), "k", 50.0)
    assert a.engine.batch_buckets == (1, 4) and a.server.port == 9002  # one dataclass per section
    assert parse_args(["--bucket-set", "fine"]).engine.bucket_set == "fine" and a.engine.bucket_set == "auto"


def test_api_key_from_a_file_or_the_environment_never_needs_the_command_line(tmp_path, monkeypatch, capsys):
    key = tmp_path / "api_key"
    key.write_text("s3cret\n")
    assert parse_args(["--api-key-file", str(key)]).api_key == "s3cret"
    monkeypatch.setenv("TROPICAL_API_KEY", "from-env")
    assert parse_args([]).api_key == "from-env"
    assert parse_args(["--api-key-file", str(key)]).api_key == "s3cret"  # the file names this server's key
    for bad, message in ((tmp_path / "missing", "cannot read --api-key-file"), (tmp_path / "empty", "is empty")):
        (tmp_path / "empty").write_text("\n")
        with pytest.raises(SystemExit):
            parse_args(["--api-key-file", str(bad)])
        assert message in capsys.readouterr().err


def test_cluster_gets_a_policy_from_its_roles_and_the_slo_knobs():
    a = parse_args(["--cluster", "1P1M", "--ttft-scale", "3", "--queue-timeout", "2"])
    assert a.policy.policy == "planned" and a.policy.ttft_scale == 3 and a.policy.queue_timeout == 2
    assert parse_args(["--cluster", "2C"]).policy.policy == "colocated"
    assert parse_args(["--cluster", "1P1D"]).policy.policy == "disaggregated"
    assert parse_args(["--cluster", "P:tp2,M:tp2"]).devices_needed == 4  # CPU hosts emulate this many
    # A knob in the policy string wins over the flag.
    assert parse_args(["--cluster", "1P1M", "--policy", "planned:ttft_scale=9"]).policy.ttft_scale == 9


@pytest.mark.parametrize("argv,message", [
    (["--policy", "tropical"], "runs on roles"),  # the single worker is one C worker
    (["--cluster", "2C", "--policy", "tropical"], "runs on roles"),
    (["--cluster", "3X"], "bad cluster"),
    (["--batch-buckets", "1,x"], "comma-separated integers"),
    (["--max-model-len", "0"], "must be positive"),
    (["--dtype", "float8"], "invalid choice"),
    (["--bucket-set", "tiny"], "invalid choice"),
    (["--cluster", "1P1M", "--tensor-parallel", "2"], "tp per worker"),
])
def test_bad_options_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_bad_config_files_exit_with_a_message(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"prot": 1}')
    with pytest.raises(SystemExit):
        parse_args(["--config", str(bad)])
    assert "unknown option 'prot'" in capsys.readouterr().err
    broken = tmp_path / "broken.toml"
    broken.write_text("port = = 1")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(broken)])
    assert "cannot read --config" in capsys.readouterr().err
