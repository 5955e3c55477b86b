"""Every DvD gRPC server (dvd/process.py: start_grpc_server) serves grpc.health.v1.Health for ""
and each of its services, and server reflection listing them, so grpc_health_probe, Kubernetes gRPC
probes and grpcurl work unchanged."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from dvd.process import start_grpc_server
from dvd.v1 import vision_pb2_grpc


def test_health_and_reflection_list_the_servers_services() -> None:
    async def main() -> None:
        server, port = await start_grpc_server(
            lambda s: vision_pb2_grpc.add_VisionServicer_to_server(vision_pb2_grpc.VisionServicer(), s),
            "127.0.0.1", 0, 1 << 20)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                for service in ("", "dvd.v1.Vision"):
                    answer = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                    assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
                try:
                    await health.Check(health_pb2.HealthCheckRequest(service="dvd.v1.Nope"), timeout=10)
                    raise AssertionError("an unknown service must be NOT_FOUND")
                except grpc.aio.AioRpcError as err:
                    assert err.code() == grpc.StatusCode.NOT_FOUND
                reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
                call = reflection.ServerReflectionInfo()
                await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
                answer = await call.read()
                await call.done_writing()
                names = {s.name for s in answer.list_services_response.service}
                assert {"dvd.v1.Vision", "grpc.health.v1.Health",
                        "grpc.reflection.v1alpha.ServerReflection"} <= names, names
        finally:
            await server.stop(None)

    asyncio.run(main())


def test_a_port_another_server_holds_is_refused_naming_it() -> None:
    """gRPC binds with SO_REUSEPORT by default: a second server on a held port would start and silently take a share
    of its connections (grpc/grpc#16920). A DvD server refuses the port instead, an OSError (exit 2) naming it."""

    async def main() -> None:
        def register(server: grpc.aio.Server) -> None:
            vision_pb2_grpc.add_VisionServicer_to_server(vision_pb2_grpc.VisionServicer(), server)

        first, port = await start_grpc_server(register, "127.0.0.1", 0, 1 << 20)
        try:
            with pytest.raises(OSError, match=f"127.0.0.1:{port}.*in use"):
                second, _ = await start_grpc_server(register, "127.0.0.1", port, 1 << 20)
                await second.stop(None)
        finally:
            await first.stop(None)

    asyncio.run(main())
