"""The server's options: its own (ServerConfig) beside the engine's and the cluster's (config.py),
all flags derived from the dataclass fields (options.py), a --config file read as flags, flags
winning over the file. Every rule on a value lives in its dataclass, so a bad flag, a bad file entry
and a bad LLM(...) argument get the same message.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import ClusterConfig, EngineConfig
from ..options import add_options, fields_of, option, read_config_file


@dataclass(frozen=True)
class ServerConfig:
    model: str | None = option(None, "local HF safetensors or orbax checkpoint directory",
                               shown_default="the embedded model")
    served_model_name: str | None = option(None, "the model id clients send", shown_default="the directory name")
    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(8000, "port to listen on; 0 picks a free port")
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on /v1/*; visible to `ps`: prefer "
                                 "--api-key-file or $TROPICAL_API_KEY")
    api_key_file: str | None = option(None, "read the API key from this file (its first line)")
    max_queue: int = option(256, "requests waiting for their prefill before 429", positive=True)
    threads: int | None = option(None, "HTTP threads", positive=True,
                                 shown_default="enough for every running and queued request")
    drain_timeout: float = option(60.0, "seconds SIGTERM waits for in-flight requests; then those left get a 503 "
                                  "(streams: an error event and [DONE]) and the exit status is 3", positive=True)
    max_body_bytes: int = option(4 << 20, "larger request bodies get 413", positive=True, shown_default="4 MiB")
    request_read_timeout: float = option(30.0, "seconds a client may take to send its request, headers and body; "
                                         "slower connections are closed", positive=True)
    jax_distributed: str = option("off", "host: on a multi-host TPU slice use only this host's chips; slice: "
                                  "jax.distributed.initialize() (see tropical_jax/cluster/distributed.py)",
                                  choices=("off", "host", "slice"))


SECTIONS = ((ServerConfig, "server"), (ClusterConfig, "scheduling"), (EngineConfig, "engine"))


@dataclass
class Options:
    """Parsed options: one dataclass per section, the policy the scheduler will run, and what the
    process needs before JAX starts. Attributes of the sections read through (options.port)."""
    server: ServerConfig
    scheduling: ClusterConfig
    engine: EngineConfig
    policy: object  # sched.config.PolicyConfig
    devices_needed: int
    threads: int

    def __getattr__(self, name):
        for section in ("server", "scheduling", "engine"):
            values = asdict(object.__getattribute__(self, section))
            if name in values:
                return values[name]
        raise AttributeError(name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tropical_jax.serve", description="the OpenAI-compatible server",
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="a JSON or TOML (.toml) file with any of these options, named with - or _ "
                                    "(flags win over the file)")
    for cls, title in SECTIONS:
        add_options(p, cls, title)
    return p


def _key_from_file(path: str | None, parser) -> str | None:
    if path is None:
        return None
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        parser.error(f"cannot read --api-key-file {path}: {e.strerror}")
    if not lines or not lines[0].strip():
        parser.error(f"--api-key-file {path} is empty")
    return lines[0].strip()


def parse_args(argv=None) -> Options:
    parser = build_parser()
    flags = vars(parser.parse_args(argv))
    values = {}
    if "config" in flags:
        known = {f.name for cls, _ in SECTIONS for f in fields_of(cls)}
        try:
            values.update(vars(parser.parse_args(read_config_file(flags.pop("config"), known))))
        except ValueError as e:
            parser.error(str(e))
    values.update(flags)
    values["api_key"] = values.get("api_key") or _key_from_file(values.get("api_key_file"), parser) \
        or os.environ.get("TROPICAL_API_KEY")
    try:
        server, cluster, engine = (cls(**{f.name: values[f.name] for f in fields_of(cls) if f.name in values})
                                   for cls, _ in SECTIONS)
        policy = cluster.policy_config(engine.max_prefill_seqs)
    except ValueError as e:
        parser.error(str(e))
    workers = len(cluster.spec().workers)
    # A thread per running or queued request, so overload is answered with 429 instead of waiting
    # unseen in the socket backlog.
    threads = server.threads or min(1024, workers * engine.max_num_seqs + server.max_queue + 16)
    return Options(server, cluster, engine, policy, cluster.devices_needed, threads)
