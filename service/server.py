"""Run the service under uvicorn with a graceful drain on SIGTERM/SIGINT.

On the signal: readiness turns false at once (load balancers stop sending), uvicorn stops
accepting connections and waits up to drain_timeout_s for in-flight requests, the lifespan then
lets the batcher finish its queue, and the process exits 0.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from model_export.manifest import load_manifest
from service.app import create_app
from service.config import Settings
from service.state import Connections
from uembed.errors import UserError


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app_state: Any) -> None:
        super().__init__(config)
        self.app_state = app_state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.app_state.draining = True
        super().handle_exit(sig, frame)


def watch_connections(server: uvicorn.Server, app: FastAPI) -> None:
    """Let the app see how many client connections `server` holds open, and when it last held more
    than one (--quiet-when-alone, --split-decode-when-alone). Before `server` starts."""
    state = app.state.uembed
    if state.settings.quiet_when_alone or state.settings.split_decode_when_alone:
        server.server_state.connections = state.http_connections = Connections()


def build_settings(overrides: dict[str, Any]) -> Settings:
    try:
        return Settings(**overrides)
    except ValidationError as e:
        lines = [f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}" for err in e.errors()]
        raise UserError("invalid settings: " + "; ".join(lines)) from None


def serve(overrides: dict[str, Any]) -> int:
    settings = build_settings(overrides)
    load_manifest(settings.model, verify=False)  # a clear error before uvicorn starts
    app = create_app(settings)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level, access_log=settings.access_log,
        timeout_graceful_shutdown=max(1, round(settings.drain_timeout_s)), lifespan="on", workers=1,
    )
    server = DrainingServer(config, app.state.uembed)
    watch_connections(server, app)
    # uvicorn re-raises the captured signal with the previous handler after its graceful shutdown;
    # a no-op handler makes a drained SIGTERM end in exit status 0 instead of 143.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()  # not asyncio.run(server.serve()): run() uses uvicorn's loop factory (uvloop when installed)
    if not server.started:
        print("uembed serve: error: the server did not start (see the log above)", file=sys.stderr)
        return 3
    return 0
