"""``KestrelServer``: the engine, the gRPC service (with health and reflection) and the HTTP
gateway, all on one asyncio event loop.

    server = KestrelServer(engine, model_id="kestrel-nano")
    await server.start(host="127.0.0.1", port=50051, http_port=8000)
    ...
    await server.stop(grace=10.0)      # stop accepting, let streams finish, cancel the rest

``serve_forever`` runs until SIGTERM/SIGINT and shuts down gracefully.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
from typing import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.kestrel.v1 import kestrel_pb2 as pb
from protos.kestrel.v1 import kestrel_pb2_grpc as pb_grpc
from serve.api.auth import ApiKeyInterceptor, KeyChecker
from serve.api.batches import BatchManager
from serve.api.convert import ModelInfo, Policy
from serve.api.grpc_server import KestrelServicer
from serve.api.http_gateway import HttpGateway
from serve.api.metrics import ServerMetrics
from serve.api.records import RecordStore
from serve.api.session import ResponseRunner
from serve.engine import Engine

log = logging.getLogger("kestrel.api")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Kestrel"].full_name


@dataclasses.dataclass(frozen=True)
class TlsConfig:
    """PEM files of the server's certificate chain and private key."""

    cert_file: str
    key_file: str

    def credentials(self) -> grpc.ServerCredentials:
        with open(self.key_file, "rb") as f:
            key = f.read()
        with open(self.cert_file, "rb") as f:
            cert = f.read()
        return grpc.ssl_server_credentials([(key, cert)])


class KestrelServer:
    """Serves one engine over gRPC and HTTP.

    Args:
      engine: the engine (started by ``start`` if its loop is not running).
      model_id: the id clients name in ``model``.
      max_output_tokens: default and bound of ``max_output_tokens`` (default: the context length).
      api_keys: keys accepted in ``authorization: Bearer``; empty: no authentication.
      tls: certificate and key for TLS on the gRPC port; None: plaintext.
      policy: effort budgets and tool limits.
      max_queued: most responses open at once before RESOURCE_EXHAUSTED.
      max_records: responses kept for Get and ``previous_response_id``.
    """

    def __init__(self, engine: Engine, *, model_id: str = "kestrel-nano", max_output_tokens: int | None = None,
                 api_keys: Sequence[str] = (), tls: TlsConfig | None = None, policy: Policy | None = None,
                 max_queued: int = 256, max_records: int = 1024):
        self.engine = engine
        ctx = engine.max_model_len
        self.model = ModelInfo(id=model_id, context_length=ctx,
                               max_output_tokens=min(max_output_tokens or ctx, ctx),
                               supports_tools=engine.tokenizer is not None,
                               supports_images=engine.takes_images)
        self.metrics = ServerMetrics()
        self.records = RecordStore(max_records)
        self.runner = ResponseRunner(engine, self.model, self.records, policy or Policy(), self.metrics,
                                     max_queued=max_queued)
        self.metrics.watch_engine(engine.stats, lambda: self.runner.active)
        self.keys = KeyChecker(api_keys)
        self.tls = tls
        self.batches = BatchManager(self.runner)
        self.health = health.aio.HealthServicer()
        self.grpc_server: grpc.aio.Server | None = None
        self.gateway: HttpGateway | None = None
        self.port: int | None = None
        self.http_port: int | None = None
        self._owns_engine_loop = False

    async def start(self, *, host: str = "127.0.0.1", port: int = 50051, http_port: int | None = 8000) -> None:
        """Binds the ports (0 picks a free one; see ``port``/``http_port``) and starts serving."""
        if self.engine._thread is None:
            self.engine.start()
            self._owns_engine_loop = True
        interceptors = [ApiKeyInterceptor(self.keys)] if self.keys.enabled else []
        server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.so_reuseport", 0)])
        pb_grpc.add_KestrelServicer_to_server(KestrelServicer(self.runner, self.batches), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server)
        address = f"{host}:{port}"
        if self.tls is not None:
            self.port = server.add_secure_port(address, self.tls.credentials())
        else:
            self.port = server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"could not bind the gRPC port {address}")
        await server.start()
        self.grpc_server = server
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if http_port is not None:
            self.gateway = HttpGateway(self.runner, self.keys, self.metrics)
            self.http_port = await self.gateway.start(host, http_port)
        log.info("serving", extra={"fields": {"model": self.model.id, "grpc": f"{host}:{self.port}",
                                              "http": None if http_port is None else f"{host}:{self.http_port}",
                                              "tls": self.tls is not None, "auth": self.keys.enabled}})

    async def stop(self, grace: float = 10.0) -> None:
        """Stops accepting, lets open streams finish for ``grace`` seconds, then cancels the rest."""
        self.runner.accepting = False
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        log.info("shutting down", extra={"fields": {"grace_s": grace, "open_responses": self.runner.active}})
        tasks = []
        if self.gateway is not None:
            tasks.append(self.gateway.stop(grace))
        if self.grpc_server is not None:
            tasks.append(self.grpc_server.stop(grace))
        await asyncio.gather(*tasks)
        if self._owns_engine_loop:
            await asyncio.to_thread(self.engine.stop)
        log.info("stopped", extra={"fields": {}})

    async def wait(self) -> None:
        if self.grpc_server is not None:
            await self.grpc_server.wait_for_termination()


async def serve_forever(server: KestrelServer, *, host: str, port: int, http_port: int | None,
                        grace: float = 10.0) -> None:
    """Starts ``server`` and runs until SIGTERM or SIGINT, then shuts down gracefully."""
    await server.start(host=host, port=port, http_port=http_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace)
