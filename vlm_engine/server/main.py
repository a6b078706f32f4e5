"""Run the server: load the engine, serve until SIGTERM or Ctrl-C, then let running requests
finish within the grace period and release the engine."""

from __future__ import annotations

import argparse
import logging
import signal
from pathlib import Path

import uvicorn

from vlm_engine.async_engine import AsyncEngine
from vlm_engine.demo.model import default_model_path
from vlm_engine.server.app import ServerConfig, build_app
from vlm_engine.server.media import MediaPolicy
from vlm_engine.server.options import api_key, engine_options

logger = logging.getLogger("vlm_engine")


def serve(args: argparse.Namespace) -> int:
    checkpoint = Path(args.model) if args.model else default_model_path()
    config = ServerConfig(
        model_name=args.served_model_name or checkpoint.resolve().name,
        api_key=api_key(args),
        media=MediaPolicy(
            allowed_local_path=args.allowed_local_media_path,
            allow_remote=args.allow_remote_media,
            remote_timeout_s=args.remote_media_timeout,
            remote_max_bytes=args.remote_media_max_bytes,
        ),
        max_request_bytes=args.max_request_bytes,
        max_waiting=args.max_waiting,
    )
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s: %(message)s")
    engine = AsyncEngine(checkpoint, **engine_options(args))
    # uvicorn stops gracefully on SIGTERM and SIGINT, then raises the signal again for the
    # handlers it found: these let the engine be released and the process exit with status 0.
    previous = {sig: signal.signal(sig, _stopped) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server = uvicorn.Server(
            uvicorn.Config(
                build_app(engine, config),
                host=args.host,
                port=args.port,
                log_level=args.log_level,
                timeout_graceful_shutdown=args.shutdown_grace,
            )
        )
        server.run()
    finally:
        engine.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _stopped(signum: int, frame: object) -> None:
    logger.info("stopped by signal %d", signum)
