"""What the API's routes share: the resources, the image store, paths and limits (builds run in
builder processes: the API stores what they upload, see routes/builds.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import httpx
from fastapi import Request

from osless.api.auth import Tokens
from osless.api.broker import Broker
from osless.api.collector import Collector
from osless.api.metrics import ApiMetrics
from osless.api.peers import Peers
from osless.api.resources import Resources
from osless.api.secrets import SecretBox
from osless.images import ImageStore

__all__ = ["ApiState", "get_state"]


@dataclass
class ApiState:
    resources: Resources
    images: ImageStore
    data_dir: Path
    gateway_url: str
    secrets: SecretBox
    max_upload_bytes: int = 100 * 1024 * 1024
    max_body_bytes: int = 6 * 1024 * 1024
    max_layer_bytes: int = 8 * 1024 * 1024 * 1024  # one layer archive a builder uploads
    http: httpx.AsyncClient = field(default_factory=lambda: httpx.AsyncClient(timeout=None))
    broker: Broker | None = None  # the message engine (async invocations); None until connected
    peers: Peers | None = None  # the servers sharing this store, for what this one lacks
    metrics: ApiMetrics = field(default_factory=ApiMetrics)  # the API's own, for `GET /metrics`
    collector: Collector = field(init=False)  # `osless up` runs it; routes ask it for a pass
    tokens: Tokens = field(init=False)

    def __post_init__(self) -> None:
        self.collector = Collector(self)
        self.tokens = Tokens(self.resources.store)

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    def app_log_dir(self, app: str) -> Path:
        return self.logs_dir / "apps" / app

    @property
    def deploy_logs_dir(self) -> Path:
        return self.logs_dir / "deploys"

    def deploy_log(self, deploy_id: str) -> Path:
        """A build log on this server's disk: only those of releases before logs moved to the store."""
        return self.deploy_logs_dir / f"{deploy_id}.log"

    @property
    def sources_dir(self) -> Path:
        return self.data_dir / "sources"

    def source(self, deploy_id: str) -> Path:
        """A queued deploy's uploaded archive, until its build ends."""
        return self.sources_dir / f"{deploy_id}.tar.gz"


def get_state(request: Request) -> ApiState:
    state: ApiState = request.app.state.osless
    return state
