"""Helpers for the search-page tests (tests/test_web_*.py): a raw HTTP client and
the deployment of the web application next to an ingress.

The client is ``http.client``: it sends the request line exactly as written, so
path-traversal attempts reach the server unnormalised (higher-level clients
collapse ``..`` before sending).
"""
from __future__ import annotations

import http.client
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from vidsearch.config import Settings

from query_support import small_options


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes = field(repr=False)

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> dict[str, Any]:
        return self.json()["error"]


@dataclass
class Http:
    """A plain HTTP/1.1 client of one Serve application mounted at ``prefix``."""

    port: int
    prefix: str = ""

    def request(self, path: str, *, method: str = "GET", headers: dict[str, str] | None = None,
                timeout: float = 60.0) -> Reply:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(method, self.prefix + path, headers=headers or {})
            response = connection.getresponse()
            body = response.read()
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, body)
        finally:
            connection.close()

    def get(self, path: str, params: Any = None, **kwargs: Any) -> Reply:
        if params:
            path += "?" + urlencode(params, doseq=True)
        return self.request(path, **kwargs)

    def search(self, params: Any, headers: dict[str, str] | None = None) -> Reply:
        return self.get("/api/search", params, headers=headers)


def web_settings(settings: Settings, **serve: Any) -> Settings:
    """``settings`` with the search page turned on (and any other serve fields)."""
    return settings.model_copy(update={"serve": settings.serve.model_copy(update={"web_enabled": True, **serve})})


def deploy_web(*apps: tuple[Settings, str, bool]) -> None:
    """Web applications (settings, route prefix, own ingress?), deployed together; one
    with its own ingress also gets an ingress application named ``serve.app_name``."""
    from ray import serve

    from vidsearch.services.query.app import query_app
    from vidsearch.services.web.app import web_app

    targets = []
    for settings, prefix, ingress in apps:
        targets.append(serve.RunTarget(web_app(settings, **small_options()), name=settings.serve.web_app_name,
                                       route_prefix=prefix))
        if ingress:
            targets.append(serve.RunTarget(query_app(settings, **small_options()), name=settings.serve.app_name,
                                           route_prefix=f"/{settings.serve.app_name}"))
    serve.run_many(targets)
