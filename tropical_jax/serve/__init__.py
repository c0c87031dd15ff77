"""`python -m tropical_jax.serve`: the OpenAI-compatible server.

    cli.py      its options (ServerConfig here, EngineConfig and ClusterConfig from config.py) as flags,
                with --config FILE.json/.toml
    server.py   the server's state, startup (engine.build.build_engine, as LLM uses), HTTP, drain
"""

from .cli import ServerConfig, parse_args
from .server import EXIT_CUT, Server, main

__all__ = ["EXIT_CUT", "Server", "ServerConfig", "main", "parse_args"]
