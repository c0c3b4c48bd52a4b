"""API keys: ``authorization: Bearer <key>`` on every call when keys are configured.

Keys come from a file (one per line, ``#`` comments) and/or an environment variable (comma
separated). Keys are compared in constant time and never logged, not even in part.
"""

from __future__ import annotations

import hmac
import os
from typing import Iterable

import grpc

from kestrel.errors import KestrelError

# Services a load balancer or a grpcurl user must reach without a key.
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def load_api_keys(path: str | None = None, env_var: str | None = None) -> tuple[str, ...]:
    """Reads the keys; empty when neither source is given.

    Raises:
      KestrelError: the file is missing or holds no key, or the variable is unset or empty.
    """
    keys: list[str] = []
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                file_keys = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
        except OSError as e:
            raise KestrelError(f"API key file {path!r} cannot be read: {e.strerror}") from None
        if not file_keys:
            raise KestrelError(f"API key file {path!r} holds no key")
        keys += file_keys
    if env_var:
        value = os.environ.get(env_var, "")
        env_keys = [k.strip() for k in value.split(",") if k.strip()]
        if not env_keys:
            raise KestrelError(f"environment variable {env_var} holds no API key")
        keys += env_keys
    return tuple(dict.fromkeys(keys))


class KeyChecker:
    """Checks an ``authorization`` value against the configured keys."""

    def __init__(self, keys: Iterable[str]):
        self._keys = tuple(k.encode() for k in keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def problem(self, authorization: str | None) -> str | None:
        """None when the value carries a valid key, else the message for UNAUTHENTICATED."""
        if not self._keys:
            return None
        if not authorization:
            return "missing API key: send the header 'authorization: Bearer <key>'"
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return "malformed authorization: expected 'Bearer <key>'"
        given = key.strip().encode()
        ok = False
        for k in self._keys:  # no early exit: the time taken says nothing about which key is near
            ok |= hmac.compare_digest(given, k)
        return None if ok else "invalid API key"


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a valid key with UNAUTHENTICATED (health and reflection stay open)."""

    def __init__(self, checker: KeyChecker):
        self._checker = checker

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if not self._checker.enabled or method.startswith(OPEN_SERVICES):
            return await continuation(handler_call_details)
        auth = dict(handler_call_details.invocation_metadata or ()).get("authorization")
        problem = self._checker.problem(auth)
        if problem is None:
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None

        async def deny(request_or_iterator, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

        if handler.response_streaming:
            async def deny_stream(request, context):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)
                yield  # pragma: no cover  (makes this an async generator)
            return grpc.unary_stream_rpc_method_handler(
                deny_stream, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(
            deny, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
