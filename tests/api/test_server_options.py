"""TLS on the gRPC port, and an HTTP client that hangs up mid-stream."""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import time

import pytest

from conftest import MODEL_ID, make_server
from serve.api.server import TlsConfig
from serve.client import Client


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls(engine, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    with make_server(engine, tls=TlsConfig(str(cert), str(key))) as server:
        with Client(server.target, tls=cert.read_bytes(), timeout=30) as client:
            assert [m.id for m in client.list_models()] == [MODEL_ID]
            assert client.create("hi", max_output_tokens=2).usage.output_tokens == 2
        with Client(server.target, timeout=5) as plain:  # a plaintext client cannot talk to it
            with pytest.raises(Exception):
                plain.list_models()


def test_http_client_hanging_up_cancels_the_response(server, engine):
    conn = http.client.HTTPConnection("127.0.0.1", server.server.http_port, timeout=30)
    body = {"model": MODEL_ID, "input": "digits", "stream": True, "max_output_tokens": 256,
            "reasoning": {"effort": "none"}, "temperature": 0.2, "seed": 5}
    conn.request("POST", "/v1/responses", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    rid = None
    while True:
        line = resp.fp.readline().decode()
        if line.startswith("data: "):
            event = json.loads(line[6:])
            if event["type"] == "response.created":
                rid = event["response"]["id"]
            if event["type"] == "response.output_text.delta":
                break
    conn.close()  # hang up mid-stream
    status = None
    for _ in range(200):
        check = http.client.HTTPConnection("127.0.0.1", server.server.http_port, timeout=10)
        check.request("GET", f"/v1/responses/{rid}")
        status = json.loads(check.getresponse().read())["status"]
        check.close()
        if status != "in_progress":
            break
        time.sleep(0.05)
    assert status == "cancelled"
    # The engine drops the request at its next step.
    for _ in range(200):
        s = engine.stats()
        if s.num_running == 0 and s.num_waiting == 0:
            break
        time.sleep(0.05)
    assert s.num_running == 0 and s.num_waiting == 0
