"""A loopback stand-in for kvtransfer.channel.KVChannel between ranks of one process (no Ray, no
torch.distributed): isend queues a copy, FIFO per (src, dst, tag); an irecv completes once its
message is there. Used by the in-process prefill + decode worker tests."""
from __future__ import annotations

from collections import defaultdict, deque


class _Work:
    def __init__(self, done=lambda: True):
        self._done = done

    def is_completed(self) -> bool:
        return self._done()

    def wait(self) -> None:
        assert self._done()


class LoopbackHub:
    """Point-to-point messages between ranks of one process, FIFO per (src, dst, tag)."""

    def __init__(self):
        self.q: dict[tuple, deque] = defaultdict(deque)

    def endpoint(self, rank: int):
        hub = self

        class End:
            def isend(self, t, peer, tag=0):
                hub.q[(rank, peer, tag)].append(t.clone())
                return _Work()

            def irecv(self, t, peer, tag=0):
                state = {"done": False}

                def done():
                    if not state["done"] and hub.q[(peer, rank, tag)]:
                        t.copy_(hub.q[(peer, rank, tag)].popleft())
                        state["done"] = True
                    return state["done"]
                return _Work(done)
        return End()
