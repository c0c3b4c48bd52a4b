"""Kestrel's API layer: the gRPC service, the OpenAI-compatible HTTP gateway, auth and metrics."""

from serve.api.auth import ApiKeyInterceptor, KeyChecker, load_api_keys
from serve.api.convert import BUILTIN_TOOLS, ModelInfo, Policy, Prepared, prepare
from serve.api.errors import ApiError
from serve.api.grpc_server import KestrelServicer
from serve.api.http_gateway import HttpGateway
from serve.api.metrics import ServerMetrics
from serve.api.records import RecordStore, ResponseRecord
from serve.api.server import KestrelServer, TlsConfig, serve_forever
from serve.api.session import ResponseRun, ResponseRunner

__all__ = ["ApiError", "ApiKeyInterceptor", "BUILTIN_TOOLS", "HttpGateway", "KestrelServer", "KestrelServicer",
           "KeyChecker", "ModelInfo", "Policy", "Prepared", "RecordStore", "ResponseRecord", "ResponseRun",
           "ResponseRunner", "ServerMetrics", "TlsConfig", "load_api_keys", "prepare", "serve_forever"]
