"""One engine on a tiny unigram model for the whole API test package (the jitted steps compile
once), and a server on free localhost ports per module that needs one."""

from __future__ import annotations

import grpc
import pytest

from protos.kestrel.v1 import kestrel_pb2 as pb
from protos.kestrel.v1 import kestrel_pb2_grpc as pb_grpc
from serve.api.convert import Policy
from serve.api.server import KestrelServer
from serve.engine import Engine
from server_thread import ServerThread
from tiny_model import build_model, build_tokenizer

# Small budgets keep every stream short: reasoning runs into its budget (a forced hand-off), then
# the answer or a tool call follows.
POLICY = Policy(effort_budgets={"low": 6, "medium": 8, "high": 12}, python_timeout_s=5.0, max_tool_rounds=2)
MODEL_ID = "kestrel-test"


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def engine(tokenizer):
    # Few compiled shapes keep the package fast on a 2-core CPU: prefill chunks of at most 32
    # tokens (buckets 16 and 32) and one page-table width covering the whole context.
    eng = Engine(build_model(tokenizer), tokenizer, num_pages=128, page_size=16, max_num_seqs=8,
                 max_num_batched_tokens=256, prefill_chunk_size=32)
    eng.runner.min_table_pages = 64
    eng.start()
    yield eng
    eng.stop()


def make_server(engine, **kw) -> ServerThread:
    kw.setdefault("policy", POLICY)
    kw.setdefault("model_id", MODEL_ID)
    kw.setdefault("max_output_tokens", 256)
    return ServerThread(KestrelServer(engine, **kw))


@pytest.fixture(scope="module")
def server(engine):
    with make_server(engine) as s:
        yield s


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.KestrelStub(channel)


def user(text: str) -> pb.InputItem:
    return pb.InputItem(message=pb.InputMessage(role=pb.ROLE_USER, content=[pb.InputContent(text=text)]))
