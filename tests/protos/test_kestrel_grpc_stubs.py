"""The generated stubs over a real gRPC channel, with health checking and reflection beside them."""

from concurrent import futures

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from protos.kestrel.v1 import kestrel_pb2 as pb
from protos.kestrel.v1 import kestrel_pb2_grpc as pb_grpc

SERVICE = pb.DESCRIPTOR.services_by_name["Kestrel"].full_name


class _EchoServicer(pb_grpc.KestrelServicer):
    """Streams the request's text back as answer deltas: enough to exercise the generated code."""

    def Create(self, request, context):
        text = request.input[0].message.content[0].text
        events = [pb.ResponseEvent(created=pb.ResponseCreated(response=pb.Response(
            id="resp_1", model=request.model, status=pb.RESPONSE_STATUS_IN_PROGRESS)))]
        events += [pb.ResponseEvent(output_text_delta=pb.OutputTextDelta(item_id="msg_1", delta=ch))
                   for ch in text]
        events.append(pb.ResponseEvent(completed=pb.ResponseCompleted(
            response_id="resp_1", usage=pb.Usage(output_tokens=len(text)))))
        for seq, event in enumerate(events):
            event.sequence_number = seq
            yield event

    def CountTokens(self, request, context):
        return pb.CountTokensResponse(input_tokens=len(request.request.instructions.split()))


@pytest.fixture(scope="module")
def channel():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_KestrelServicer_to_server(_EchoServicer(), server)
    health_servicer = health.HealthServicer()
    health_servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE, reflection.SERVICE_NAME, health.SERVICE_NAME), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch
    server.stop(grace=None)


def test_streaming_create_and_unary_calls(channel):
    stub = pb_grpc.KestrelStub(channel)
    req = pb.CreateRequest(model="m", input=[pb.InputItem(message=pb.InputMessage(
        role=pb.ROLE_USER, content=[pb.InputContent(text="héllo")]))])
    events = list(stub.Create(req, timeout=10))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].WhichOneof("event") == "created" and events[0].created.response.model == "m"
    assert "".join(e.output_text_delta.delta for e in events[1:-1]) == "héllo"
    assert events[-1].completed.usage.output_tokens == 5
    n = stub.CountTokens(pb.CountTokensRequest(request=pb.CreateRequest(instructions="a b c")), timeout=10)
    assert n.input_tokens == 3


def test_unimplemented_rpc_is_a_status_not_a_crash(channel):
    with pytest.raises(grpc.RpcError) as err:
        pb_grpc.KestrelStub(channel).Get(pb.GetRequest(response_id="resp_x"), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_health_and_reflection(channel):
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    # A client with no stubs discovers the API through reflection.
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    service = pool.FindServiceByName(SERVICE)
    assert {m.name for m in service.methods} >= {"Create", "Get", "Cancel", "Delete", "ListModels",
                                                 "CountTokens", "CreateBatch", "GetBatch", "CancelBatch"}
    event = pool.FindMessageTypeByName("kestrel.v1.ResponseEvent")
    assert "function_call_arguments_delta" in event.fields_by_name
