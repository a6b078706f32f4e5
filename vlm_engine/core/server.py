"""The engine core's own process: `python -m vlm_engine.core.server`.

It builds the model and the `EngineCore`, then loops: take every message the frontend has sent
(new requests, aborts, calls), run a step while any request is unfinished, and push that step's
outputs. The frontend meanwhile tokenizes, loads and preprocesses images, and detokenizes.

Messages are multipart ZMQ messages whose first frame names the kind (see `messages.py`); nothing
is unpickled. The process exits on a shutdown message, when its parent is gone, or after telling
the frontend why it failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import torch
import zmq

from vlm_engine.core import messages
from vlm_engine.core.engine_core import EngineCore
from vlm_engine.engine_config import EngineConfig
from vlm_engine.vocab import protocol
from vlm_engine.vocab.request import RequestStatus

logger = logging.getLogger("vlm_engine")
PARENT_CHECK_SECONDS = 0.5
CUDA_CORE_THREADS = 4
CALLS = ("stats", "all_blocks_free", "reset_prefix_cache", "evict_unreferenced_encoder_outputs")


class CoreServer:
    def __init__(self, core: EngineCore, inbox: zmq.Socket, outbox: zmq.Socket, parent_pid: int):
        self.core = core
        self.inbox = inbox
        self.outbox = outbox
        self.parent_pid = parent_pid
        self.running = True

    def serve(self) -> None:
        core, poller = self.core, zmq.Poller()
        poller.register(self.inbox, zmq.POLLIN)
        checked_at = time.monotonic()
        while self.running:
            busy = core.has_unfinished()
            timeout = 0 if busy else int(PARENT_CHECK_SECONDS * 1000)
            while self.running and poller.poll(timeout):
                self.handle(self.inbox.recv_multipart(copy=False))
                timeout = 0
            if time.monotonic() - checked_at > PARENT_CHECK_SECONDS:
                checked_at = time.monotonic()
                if os.getppid() != self.parent_pid:  # the frontend died without a goodbye
                    logger.warning("engine core: the frontend process is gone; exiting")
                    return
            if self.running and core.has_unfinished():
                outputs = core.step()
                if outputs:
                    self.outbox.send_multipart(
                        [protocol.OUTPUTS, messages.encode_outputs(outputs)], copy=False
                    )

    def handle(self, frames: list[zmq.Frame]) -> None:
        kind = frames[0].bytes
        if kind == protocol.ADD:
            self.core.add_request(messages.decode_request([f.buffer for f in frames[1:]]))
        elif kind == protocol.ABORT:
            header = messages.unpack(frames[1].buffer)
            status = RequestStatus[header["status"]]
            self.core.abort_requests([str(i) for i in header["ids"]], status)
        elif kind == protocol.CALL:
            header = messages.unpack(frames[1].buffer)
            if header["method"] not in CALLS:
                raise protocol.MessageError(f"unknown call {header['method']!r}")
            result = getattr(self.core, header["method"])()
            reply = messages.pack({"id": header["id"], "result": result})
            self.outbox.send_multipart([protocol.REPLY, reply])
        elif kind == protocol.SHUTDOWN:
            self.running = False
        else:
            raise protocol.MessageError(f"unknown message kind {kind[:32]!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="vlm_engine core process (started by Engine)")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--config", required=True, help="EngineConfig fields as JSON")
    parser.add_argument("--inbox", required=True, help="ZMQ address the frontend pushes to")
    parser.add_argument("--outbox", required=True, help="ZMQ address the frontend pulls from")
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the frontend's to handle
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s core: %(message)s")
    context = zmq.Context()
    inbox, outbox = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    inbox.setsockopt(zmq.RCVHWM, 0)
    outbox.setsockopt(zmq.SNDHWM, 0)
    inbox.connect(args.inbox)
    outbox.connect(args.outbox)
    core = None
    try:
        from vlm_engine.core.launch import build_core
        from vlm_engine.device import resolve_device

        config = EngineConfig(**json.loads(args.config))
        if resolve_device(config).type == "cuda":
            # The core's CPU tensor ops are small; a full pool of intra-op threads would only
            # compete with the frontend's preprocessing threads for the cores.
            torch.set_num_threads(min(CUDA_CORE_THREADS, torch.get_num_threads()))
        core = build_core(Path(args.checkpoint), config)
        ready = messages.pack({"max_model_len": core.max_model_len})
        outbox.send_multipart([protocol.READY, ready])
        CoreServer(core, inbox, outbox, args.parent_pid).serve()
        return 0
    except BaseException as e:  # tell the frontend why, then exit
        failure = {"type": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()}
        outbox.send_multipart([protocol.FAILED, messages.pack(failure)])
        logger.error("engine core failed:\n%s", failure["traceback"])
        return 1
    finally:
        if core is not None:
            core.close()
        context.destroy(linger=5000)  # deliver what is queued (the failure, last outputs)


if __name__ == "__main__":
    sys.exit(main())
