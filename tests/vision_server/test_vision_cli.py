"""`dvd vision` as a process: serves, and on SIGTERM finishes its in-flight request, then exits 0."""

from __future__ import annotations

import signal
from pathlib import Path

from dvd.v1 import common_pb2, vision_pb2, vision_pb2_grpc
from tests.conftest import encode, photo_like
from tests.serve_process import server_process
from tests.vision_server.vision_harness import Harness

READY = "dvd vision serving on "


def test_sigterm_finishes_in_flight_work_and_exits_cleanly(tiny_hf: Path) -> None:
    # A batch that never fills and a wait that never ends: the request sits in the batcher until the
    # drain on SIGTERM runs it.
    sink = Harness()
    args = ["vision", "--model", str(tiny_hf), "--port", "0", "--max-wait-ms", "600000", "--max-batch-tiles", "64",
            "--cache-mib", "0", "--log-level", "WARNING", "--allow-destinations", sink.sink.address]
    try:
        with server_process(args, READY, 120) as server:
            stub = vision_pb2_grpc.VisionStub(server.channel)
            request = vision_pb2.EncodeRequest(
                request_id="in-flight", destination=sink.sink.address,
                inputs=[vision_pb2.MediaInput(data=encode(photo_like(900, 450)), max_num=2)])
            future = stub.Encode.future(request)
            while stub.Stats(common_pb2.StatsRequest()).counters["num_tiles_preprocessed"] == 0:
                assert not future.done(), future.exception()
            server.proc.send_signal(signal.SIGTERM)
            response = future.result(60)
            assert response.slots[0].num_tokens == 256 * 3  # 2 x 1 tiles and the thumbnail
            assert sink.sink.wait("in-flight", 1)[0][0].shape == (768, 64)
            assert "dvd vision stopped" in server.stopped(60)
    finally:
        sink.close()
