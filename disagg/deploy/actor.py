"""The Ray actor around a prefill or a decode worker. Arguments and results are msgpack bytes.

One actor per GPU (a CPU actor when there is none). Set-up is in steps, because the
KV channel's groups are built with every peer at once (kvtransfer/groups.py; the store
is hosted by the driver):
  1. __init__: nothing heavy;  2. setup(): build the KV channel's groups, load the model,
  build the worker;  3. handshake() / measure_bandwidth() / codec_speed();  4. start(codec):
  run the loop thread.

After a restart (Ray re-runs __init__ in a new process: disagg/deploy/recovery.py) the same
steps run under a new epoch with the live peers only, while each live peer calls
reconnect(rank, epoch); ring groups are re-formed with ring_down / reform_ring / ring_up.
Those calls change what the loop thread uses, so they hold the step lock: the loop runs one
step at a time under it.

Roles: prefill / decode (a worker: TP rank 0 when it spans a tensor-parallel group), prefill_cp
(a ring helper), prefill_tp / decode_tp (a TP follower: runs what its leader broadcasts).
"""
from __future__ import annotations

import contextlib
import os
import threading
import traceback

import ray


@ray.remote(max_concurrency=8)
class WorkerActor:
    def __init__(self, role: str, rank: int):
        self.role = role
        self.rank = rank
        self.worker = None
        self.kv = None                  # the KVChannel (self.channel may wrap it: fault injection)
        self.error: str | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.tp_leader = None           # a worker spanning a TP group: announces its collectives
        self._step_lock = threading.Lock()
        self._paused = threading.Event()

    def incarnation(self) -> dict:
        """Which process answers, and whether it was set up (a restarted one was not)."""
        return {"pid": os.getpid(), "set_up": self.kv is not None, "error": self.error}

    def setup(self, engine_cfg: dict, num_prefill: int, num_decode: int, init_method: str, torch_threads: int,
              prefill_cp: int = 1, prefill_tp: int = 1, decode_tp: int = 1, epoch: int = 0,
              peers: list[int] | None = None, loopback: bool = True) -> str:
        """Build the KV channel under `epoch`: every group at bring-up (epoch 0); after a restart,
        pairs with `peers` (the live ones) and no worker group (reform_ring builds a ring's)."""
        import torch

        from disagg.config import ModelConfig
        from disagg.deploy.config_codec import engine_config_from_dict
        from kvtransfer.channel import ChannelConfig, KVChannel
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.cfg = engine_config_from_dict(engine_cfg)
        self.epoch = epoch               # stamped on this process's transfer messages
        mc = ModelConfig.from_dir(self.cfg.model_dir)
        host = "127.0.0.1" if loopback else ray.util.get_node_ip_address()
        self.kv = KVChannel(ChannelConfig(self.rank, num_prefill, num_decode, init_method, prefill_cp=prefill_cp,
                                          prefill_tp=prefill_tp, decode_tp=decode_tp, num_kv_heads=mc.num_kv_heads,
                                          listen_host=host),
                            self.cfg.torch_device, epoch=epoch, peers=None if peers is None else set(peers),
                            worker_group=epoch == 0)
        self.channel = self.kv
        # this rank's worker group: {prefill leader, its ring helpers} or {worker, its TP followers}
        self.cp_group = self.kv.cp_group
        self.kv.warmup()
        return f"{self.role} rank {self.rank} on {self.cfg.torch_device} (pid {os.getpid()}, epoch {epoch})"

    # ------------------------------------------------------------------ re-forming groups (restarts)
    def reconnect(self, peer: int, epoch: int) -> None:
        """`peer` restarted: build the new pair group with it (blocks until its side is up), then,
        between two steps, swap it in and forget what the worker held for the peer's old process."""
        pg = self.kv.build_pair(peer, epoch)
        with self._between_steps():
            self.kv.install_pair(peer, pg)
            if self.worker is not None:
                self.worker.reset_peer(peer, epoch)

    def drop_peer(self, peer: int) -> None:
        """`peer` died: abort its group so that nothing waits on it (NCCL would until the timeout)."""
        if self.kv is not None:
            self.kv.drop_peer(peer)

    def ring_down(self) -> None:
        """A member of this rank's ring died: stop using the ring (a leader prefills every prompt
        alone) and abort the group, so that a ring step in flight fails instead of hanging."""
        from kvtransfer.groups import abort
        if self.worker is not None and hasattr(self.worker, "set_ring"):
            self.worker.set_ring(None)
        abort(self.cp_group)

    def reform_ring(self, epoch: int) -> None:
        """Build the ring group anew with every member (each calls this with the same epoch);
        a leader keeps it unused until ring_up()."""
        g = self.kv.build_worker_group(epoch)
        with self._between_steps():
            self.cp_group = g
            if self.worker is not None and self.role == "prefill_cp":
                self.worker.set_group(g)

    @contextlib.contextmanager
    def _between_steps(self):
        self._paused.set()
        try:
            with self._step_lock:
                yield
        finally:
            self._paused.clear()

    def ring_up(self) -> None:
        if self.worker is not None and hasattr(self.worker, "set_ring"):
            self.worker.set_ring(self.cp_group)

    def measure_bandwidth(self, peer: int, nbytes: int) -> float:
        return self.channel.measure_bandwidth(peer, nbytes)

    def codec_speed(self, names: list[str], num_tokens: int) -> dict:
        from disagg.config import ModelConfig
        from kvtransfer.codec_select import measure_codecs
        mc = ModelConfig.from_dir(self.cfg.model_dir)
        return measure_codecs(names, num_tokens, mc.num_kv_heads, mc.head_dim, self.cfg.torch_dtype,
                              self.cfg.torch_device)

    def handshake(self, codec: str) -> bytes:
        from disagg.config import ModelConfig
        from disagg.messages import encode
        from kvtransfer.handshake import make_handshake
        mc = ModelConfig.from_dir(self.cfg.model_dir)
        return encode(make_handshake(mc, str(self.cfg.torch_dtype).removeprefix("torch."),
                                     self.cfg.cache.block_size, codec))

    def start(self, codec_name: str, decode_handles: dict, transfer_timeout_s: float = 30.0,
              kv_fault_rate: float = 0.0, ring: dict | None = None) -> str:
        """ring (a prefill leader with --prefill-cp > 1): {"helpers": [helper actors], "min_tokens": n}."""
        from kvtransfer.codec import get_codec
        codec = get_codec(codec_name)
        tp, reshard = self._tp_parts()
        if kv_fault_rate and self.role == "prefill":     # chaos testing: flip bytes on the wire
            from kvtransfer.faults import CorruptingChannel
            self.channel = CorruptingChannel(self.channel, kv_fault_rate, seed=self.rank)
        if self.role == "prefill":
            from disagg.messages import encode
            from prefill.worker import PrefillWorker
            handles = {int(k): v for k, v in decode_handles.items()}
            from dataclasses import replace as stamp
            epoch = self.epoch
            # TransferPlan / PlanDone carry this process's epoch: a decode worker drops what a dead
            # predecessor sent once it has re-formed its pair with the restarted one (reconnect)
            send = lambda dest, msg: handles[dest].control.remote(encode(stamp(msg, epoch=epoch)))  # noqa: E731
            if ring:      # context parallelism: long prompts are prefilled by this worker and its helpers
                from prefill.ring_worker import RingPrefillWorker
                step = lambda msg: [h.ring_step.remote(encode(msg)) for h in ring["helpers"]]  # noqa: E731
                self.worker = RingPrefillWorker(self.cfg, self.rank, self.channel, codec, send, self.cp_group, step,
                                                ring["min_tokens"])
            else:
                self.worker = PrefillWorker(self.cfg, self.rank, self.channel, codec, send, tp=tp, reshard=reshard)
        elif self.role == "prefill_cp":
            from prefill.ring_worker import RingHelper
            self.worker = RingHelper(self.cfg, self.rank, self.cp_group)
        elif self.role in ("prefill_tp", "decode_tp"):
            from disagg.engine.tp_group import TPFollower
            from disagg.model.tensor_parallel import TensorParallel
            self.worker = TPFollower(self.cfg, self.role, self.channel, codec, TensorParallel.of(self.cp_group),
                                     reshard)
        else:
            from decode.worker import DecodeWorker
            self.worker = DecodeWorker(self.cfg, self.rank, self.channel, codec, transfer_timeout_s, tp=tp,
                                       reshard=reshard)
        self.tp_leader = tp
        self._thread = threading.Thread(target=self._loop, name=f"{self.role}-{self.rank}", daemon=True)
        self._thread.start()
        return f"{self.role} {self.rank}: {self.worker.__class__.__name__} with codec {codec_name}"

    def _tp_parts(self):
        """(TPLeader or None, Reshard or None) of this rank (disagg/engine/tp_group.py, kvtransfer/reshard.py)."""
        lay = self.channel.cfg
        if lay.prefill_tp == 1 and lay.decode_tp == 1:
            return None, None
        from kvtransfer.reshard import Reshard
        reshard = Reshard(lay, lay.num_kv_heads, self.rank) if self.role != "prefill_cp" else None
        if self.role not in ("prefill", "decode") or lay.tp_of(self.rank) == 1:
            return None, reshard
        from disagg.engine.tp_group import TPLeader
        from disagg.model.tensor_parallel import TensorParallel
        return TPLeader(TensorParallel.of(self.cp_group), self.cfg.torch_device, reshard), reshard

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                while self._paused.is_set():      # a re-forming call waits for the lock: let it in
                    self._stop.wait(0.001)
                with self._step_lock:
                    self.worker.run_step()
                if self.tp_leader is not None:
                    self.tp_leader.heartbeat()
        except Exception as e:  # noqa: BLE001 - reported through health()
            self.error = f"{self.role} {self.rank} failed: {type(e).__name__}: {e}"
            traceback.print_exc()

    # ------------------------------------------------------------------ control plane
    def ring_step(self, data: bytes) -> None:
        from disagg.messages import RingStep, decode
        self.worker.submit(decode(data, RingStep))

    def submit(self, data: bytes) -> None:
        from disagg.messages import PrefillRequest, decode
        self.worker.submit(decode(data, PrefillRequest))

    def reserve(self, data: bytes) -> bytes:
        from disagg.messages import Reserve, decode, encode
        return encode(self.worker.reserve(decode(data, Reserve)))

    def control(self, data: bytes) -> None:
        from disagg.messages import decode
        if self.worker is None:
            # a restarted process not yet set up: the message was meant for its predecessor, whose
            # plans the sender forgets on reconnect (and whose requests the router re-dispatched)
            return
        self.worker.control(decode(data))

    def abort(self, request_id: str) -> None:
        if self.worker is None:          # restarted, not yet set up: holds no request
            return
        if self.role == "prefill":
            self.worker.abort(request_id)
        else:
            self.worker.control(request_id)

    def take_outputs(self, timeout: float) -> bytes:
        from disagg.messages import encode_many
        if self.error:
            raise RuntimeError(self.error)
        return encode_many(self.worker.take_outputs(timeout))

    def load(self) -> bytes:
        from disagg.messages import encode
        return encode(self.worker.load())

    def transfer_stats(self) -> dict:
        s = self.worker.sender.stats if self.role == "prefill" else self.worker.receiver.stats
        return {"bytes_raw": s.bytes_raw, "bytes_wire": s.bytes_wire, "seconds": s.seconds, "plans": s.plans,
                "failures": s.failures,
                "fallbacks": getattr(self.worker, "fallbacks", 0),
                "local_prefills": getattr(self.worker, "local_prefills", 0),
                "ring_prefills": getattr(self.worker, "ring_prefills", 0),
                "flipped": getattr(self.channel, "flipped", 0)}

    def check_integrity(self) -> bool:
        bm = self.worker.bm if self.role == "prefill" else self.worker.engine.block_manager
        bm.check_integrity()
        return True

    def health(self) -> str | None:
        return self.error

    def where(self, request_id: str) -> dict:
        """Where this worker holds a request (diagnostics for a request that stopped moving)."""
        w = self.worker
        if w is None:
            return {"set_up": False}
        if hasattr(w, "where"):
            return w.where(request_id)
        return {"queued": request_id in getattr(w, "dest", {})}

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            if self.tp_leader is not None and not self._thread.is_alive():
                self.tp_leader.stop()      # the followers leave their loops
