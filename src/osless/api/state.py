"""What the API's routes share: the resources, the image store and builder, paths and limits."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from fastapi import Request

from osless.api.auth import Tokens
from osless.api.collector import Collector
from osless.api.resources import Resources
from osless.api.secrets import SecretBox
from osless.builder import Builder
from osless.images import ImageStore

__all__ = ["ApiState", "get_state"]


@dataclass
class ApiState:
    resources: Resources
    images: ImageStore
    builder: Builder
    data_dir: Path
    gateway_url: str
    secrets: SecretBox
    max_upload_bytes: int = 100 * 1024 * 1024
    max_body_bytes: int = 6 * 1024 * 1024
    http: httpx.AsyncClient = field(default_factory=lambda: httpx.AsyncClient(timeout=None))
    builds: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    builder_id: str = ""  # this server's key under /builders/, on its lease: named by the deploys it builds
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
        return self.deploy_logs_dir / f"{deploy_id}.log"


def get_state(request: Request) -> ApiState:
    state: ApiState = request.app.state.osless
    return state
