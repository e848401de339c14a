"""KV transfer benchmark: the link, the codecs, layer-wise streaming of a whole prompt, and the
prefill -> decode handoff, between two processes through kvtransfer.KVChannel.

    python benchmarks/bench_kvtransfer.py                        # 2 GPUs, NCCL (NVLink where there is one)
    python benchmarks/bench_kvtransfer.py --handoff              # + the handoff of a real 8B prefill
    NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_IB_DISABLE=1 NCCL_SOCKET_IFNAME=lo \\
        python benchmarks/bench_kvtransfer.py --label socket     # NCCL over TCP sockets on loopback
    python benchmarks/bench_kvtransfer.py --backend gloo --label gloo   # gloo: payloads staged via host
    python benchmarks/bench_kvtransfer.py --quick --backend gloo [--handoff --shape tiny]   # CPU smoke run

The parent spawns two processes: rank 0 = prefill side (cuda:0), rank 1 = decode side (cuda:1);
on CPU both use gloo on the CPU. Within a section both ranks run the same steps; a TCPStore held
by the parent carries barriers, timestamps, results and failure flags (benchmarks/kvt_common.py),
so one failed or hung section costs only itself, and --deadline-s bounds the whole run.

    1 bandwidth  one-way rank 0 -> rank 1 through the channel's pair subgroup: the receiver sends
                 a 1-byte "go", the sender times [reps messages + the receiver's 1-byte ack] by the
                 host clock after completion (polled). single: 1 message; stream: back-to-back
                 messages (64 MiB or more in flight). Median over iterations after warm-up.
                 gloo: "wire" = host tensors (the link itself); on GPU also "staged" = device
                 tensors copied through pinned host buffers (what a gloo worker pays).
    2 codecs     one layer's KV [2, T, Hkv, D] (T=2048: 8 MiB bf16 for Llama-3-8B): encode time on
                 rank 0's device, decode (+ checksum) on rank 1's, CUDA events, rotating over 8
                 inputs (64 MiB, above the L2), compression ratio, and decode(encode(kv)) error.
    3 e2e        a whole prompt (all layers) with KVSender / KVReceiver as the workers use them:
                 per layer gather from a paged cache -> encode -> isend; irecvs posted before the
                 start -> poll -> decode -> write_kv into a paged cache (scattered blocks).
                 effective throughput = raw KV bytes / (first encode on rank 0 -> last layer in
                 rank 1's cache), the two ends read on the host wall clock both processes share.
                 The receiver's cache is poisoned (NaN) before each run and checked after.
    4 handoff    (--handoff) a real prefill of a T-token prompt on a dummy-weight model on rank 0,
                 streaming each layer from the forward's layer_hook (as prefill/worker.py); rank 1
                 runs a decode ModelRunner (CUDA graphs) + Scheduler + BlockManager as LLMEngine
                 does for a decode worker (reserve -> post irecvs before the prefill -> poll ->
                 first token -> add_prefilled -> one decode step). handoff = wall time from the end
                 of the prefill's last-layer hook (a CUDA event mapped to the wall clock) to the
                 end of the decode step that used the transferred KV. The first token goes over
                 the channel right after the prefill samples it (standing in for PlanDone).

Results: benchmarks/results/kvtransfer_<gpu>_<label>.json and $OUT/ when set; table printed last.
"""
from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import sys
import threading
import time
import traceback
from datetime import timedelta

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.kvt_common import (Control, PeerDead, RecordingChannel, StagedChannel,  # noqa: E402
                                   fresh_pair_group, now_wall, read_json_key)

KiB, MiB, GiB = 2**10, 2**20, 2**30
SECTIONS = ("bandwidth", "codecs", "e2e", "handoff")
# share of --deadline-s each section may use at most (also bounded by what is left)
SECTION_SHARE = {"bandwidth": 0.30, "codecs": 0.25, "e2e": 0.35, "handoff": 0.65}
TAG_GO, TAG_DATA, TAG_ACK, TAG_TOK, TAG_HS = 9001, 9002, 9003, 9004, 9005
HANDOFF_TARGET_S = 5e-3
NCCL_ENV = ("NCCL_P2P_DISABLE", "NCCL_SHM_DISABLE", "NCCL_IB_DISABLE", "NCCL_SOCKET_IFNAME", "NCCL_NET",
            "NCCL_NVLS_ENABLE", "NCCL_P2P_LEVEL", "NCCL_PROTO", "NCCL_ALGO", "NCCL_DEBUG", "CUDA_VISIBLE_DEVICES")


def log(rank, msg: str) -> None:
    who = "main" if rank is None else f"r{rank}"
    print(f"[bench_kvtransfer {who} {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fmt_size(n: int) -> str:
    for unit, div in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= div and n % div == 0:
            return f"{n // div} {unit}"
    return f"{n} B"


# ====================================================================== child (one rank)
class Rank:
    def __init__(self, rank: int, a: dict, store_port: int, init_port: int, deadline_wall: float):
        self.rank = rank
        self.a = a
        self.peer = 1 - rank
        self.deadline_wall = deadline_wall
        self.errors: list[dict] = []
        self.ctl = Control("127.0.0.1", store_port, rank)
        if a["device"] == "cuda":
            torch.cuda.set_device(rank)
            self.device = torch.device("cuda", rank)
        else:
            self.device = torch.device("cpu")
            torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        from benchmarks.bench_engine import SHAPES
        self.shape = SHAPES[a["shape"]]
        self.L = self.shape["num_hidden_layers"]
        self.H = self.shape["num_key_value_heads"]
        self.D = self.shape.get("head_dim") or self.shape["hidden_size"] // self.shape["num_attention_heads"]
        self.T = a["tokens"]
        from kvtransfer.channel import ChannelConfig, KVChannel
        self.ch = KVChannel(ChannelConfig(rank, 1, 1, f"tcp://127.0.0.1:{init_port}", backend=a["backend"],
                                          timeout_s=max(60.0, a["deadline_s"]), host_store=rank == 0), self.device)
        self.staged = self.ch.backend == "gloo" and (self.cuda or a["force_staged"])
        if self.ch.backend == "gloo" and a["gloo_yield_s"] >= 0:
            self.ctl.yield_s = a["gloo_yield_s"]
        self.link = StagedChannel(self.ch) if self.staged else self.ch
        info = common.machine_info(self.device)
        info.update(backend=self.ch.backend, staged=self.staged, pid=os.getpid(),
                    slug=common.device_slug(self.device),
                    env={k: os.environ[k] for k in NCCL_ENV if k in os.environ})
        if self.cuda:
            try:
                info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
            except Exception:  # noqa: BLE001
                info["nccl"] = None
            try:
                info["p2p_access"] = torch.cuda.can_device_access_peer(rank, self.peer)
            except Exception:  # noqa: BLE001
                info["p2p_access"] = None
        self.ctl.report(f"info/{rank}", info)
        log(rank, f"{self.device} {info.get('gpu') or 'cpu'}, backend {self.ch.backend}"
                  f"{' (staged through pinned host buffers)' if self.staged else ''}, pid {os.getpid()}")

    # ------------------------------------------------------------------ plumbing
    def sync(self) -> None:
        """Wait for this process's compute stream only (never the NCCL streams: see kvt_common)."""
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()

    def wait_works(self, works) -> None:
        pending = list(works)
        self.ctl.wait_until(lambda: all(w.is_completed() for w in pending))
        for w in pending:
            w.wait()

    def handshake(self) -> None:
        """One byte rank 0 -> rank 1 over the pair group, both ranks past a barrier. NCCL creates a
        point-to-point communicator lazily, blocking the host in the first isend/irecv until the peer
        issues one too: a section whose first operation comes before a barrier (the receiver posts
        its irecvs, then waits for the sender) would otherwise deadlock on a fresh group."""
        dev = self.device if self.ch.backend == "nccl" else torch.device("cpu")
        t = torch.ones(1, dtype=torch.uint8, device=dev)
        w = self.ch.isend(t, 1, tag=TAG_HS) if self.rank == 0 else self.ch.irecv(t, 0, tag=TAG_HS)
        self.wait_works([w])

    def budget(self, name: str) -> float:
        left = self.deadline_wall - time.time() - 5.0
        return max(1.0, min(left, SECTION_SHARE[name] * self.a["deadline_s"]))

    def run(self) -> None:
        prev = None
        for name in self.a["sections"]:
            out: dict = {}
            t0 = time.perf_counter()
            try:
                self.ctl.begin(name, self.budget(name))
                # after the start barrier both ranks have finished `prev`, so they agree on its flags
                if prev is not None and (self.ctl.failed(prev, 0) or self.ctl.failed(prev, 1)):
                    fresh_pair_group(self.ch)
                    log(self.rank, f"section {prev} failed: new pair subgroup for {name}")
                self.handshake()
                log(self.rank, f"section {name} (budget {self.ctl.deadline - time.monotonic():.0f} s)")
                getattr(self, f"sec_{name}")(out)
            except PeerDead:
                self.record(name, out, sys.exc_info()[1])
                break
            except BaseException as e:  # noqa: BLE001 - one section must not lose the others
                self.record(name, out, e)
            out["section_s"] = time.perf_counter() - t0
            self.ctl.report(f"res/{self.rank}/{name}", out)
            prev = name
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()
        self.ctl.report(f"done/{self.rank}", True)

    def inject(self, section: str) -> None:
        """Fault injection for testing the failure handling: KVT_INJECT=<rank>:<section>:raise|exit."""
        spec = os.environ.get("KVT_INJECT", "")
        if spec and spec.split(":")[:2] == [str(self.rank), section]:
            if spec.endswith(":exit"):
                os._exit(9)
            raise RuntimeError(f"injected failure in {section}")

    def record(self, section: str, out: dict, e: BaseException) -> None:
        tb = traceback.format_exc()
        print(f"[bench_kvtransfer r{self.rank}] section {section} failed:\n{tb}", file=sys.stderr, flush=True)
        msg = f"{type(e).__name__}: {e}"
        out["error"] = msg
        self.errors.append(dict(rank=self.rank, section=section, error=msg, traceback=tb))
        self.ctl.report(f"errors/{self.rank}", self.errors)
        try:
            self.ctl.fail(msg)
        except Exception:  # noqa: BLE001
            pass

    def rand_bytes(self, n: int, device) -> torch.Tensor:
        g = torch.Generator().manual_seed(n)
        chunk = torch.randint(0, 256, (min(n, MiB),), dtype=torch.uint8, generator=g).to(device)
        return chunk.repeat(-(-n // chunk.numel()))[:n] if n > chunk.numel() else chunk

    # ------------------------------------------------------------------ 1. bandwidth
    def _pingpong(self, link, buf, reps: int, n: int, dev) -> list[float]:
        """n timed transfers of `reps` back-to-back messages rank 0 -> rank 1; times on rank 0."""
        go = torch.ones(1, dtype=torch.uint8, device=dev)
        ack = torch.ones(1, dtype=torch.uint8, device=dev)
        nccl = self.ch.backend == "nccl"
        ts = []
        for _ in range(n):
            if self.rank == 0:
                w = link.irecv(go, 1, tag=TAG_GO)
                self.wait_works([w])
                self.inject("bandwidth")
                t0 = time.perf_counter()
                sends = [link.isend(buf, 1, tag=TAG_DATA) for _ in range(reps)]
                wa = link.irecv(ack, 1, tag=TAG_ACK)
                self.ctl.wait_until(wa.is_completed)
                ts.append(time.perf_counter() - t0)
                self.wait_works(sends + [wa])
            else:
                g = link.isend(go, 0, tag=TAG_GO)
                recvs = [link.irecv(buf, 0, tag=TAG_DATA) for _ in range(reps)]
                if nccl:                    # same NCCL stream: runs after the receives, no host round trip
                    wa = link.isend(ack, 0, tag=TAG_ACK)
                    self.wait_works(recvs + [wa, g])
                else:                       # gloo sends at once: ack only once the data is in place
                    self.wait_works(recvs)
                    self.sync()             # staged: the host -> device copies ran
                    wa = link.isend(ack, 0, tag=TAG_ACK)
                    self.wait_works([wa, g])
        return ts

    def sec_bandwidth(self, out: dict) -> None:
        a = self.a
        wire_dev = self.device if self.ch.backend == "nccl" else torch.device("cpu")
        variants = [("wire", self.ch, wire_dev)]
        if self.staged:
            variants.append(("staged", self.link, self.device))
        out["rows"] = rows = []
        out["method"] = ("rank 0 times [go received -> reps messages sent -> 1-byte ack received] by the host "
                         "clock (completion polled); one-way bytes/s = reps * size / median")
        first = True
        for size in a["sizes"]:                 # largest last: a failure there loses only its own rows
            for vname, link, dev in variants:
                buf = self.rand_bytes(size, dev)
                row = dict(variant=vname, bytes=size, device=str(dev))
                modes = [("single", 1)]
                stream_reps = max(1, (64 * MiB) // size) if self.cuda or size <= MiB else max(1, (16 * MiB) // size)
                stream_reps = min(stream_reps, 64)
                if stream_reps > 1:
                    modes.append(("stream", stream_reps))
                for mode, reps in modes:
                    warm = 3 if first else 1
                    first = False
                    wt = self._pingpong(link, buf, reps, warm, dev)
                    key = f"iters/{vname}/{size}/{mode}"
                    if self.rank == 0:       # as many as fit ~target seconds, within [3, max]
                        t_one = max(wt[-1], 1e-6)
                        iters = int(max(3, min(a["bw_iters"], a["bw_target_s"] / t_one)))
                        self.ctl.put(key, iters)
                    else:
                        iters = self.ctl.get(key)
                    ts = self._pingpong(link, buf, reps, iters, dev)
                    if self.rank == 0:
                        s = common.summarize(ts)
                        s["bytes_per_s"] = reps * size / s["median_s"]
                        s["reps"] = reps
                        row[mode] = s
                if self.rank == 0:
                    rows.append(row)
                    extra = (f", stream x{row['stream']['reps']} {row['stream']['bytes_per_s'] / 1e9:.2f} GB/s"
                             if "stream" in row else "")
                    log(0, f"bandwidth {vname} {fmt_size(size)}: single {row['single']['bytes_per_s'] / 1e9:.2f} GB/s "
                           f"({row['single']['median_s'] * 1e3:.3f} ms){extra}")
                del buf
        if self.cuda:
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ 2. codecs
    def sec_codecs(self, out: dict) -> None:
        from kvtransfer.codec import get_codec
        a = self.a
        shape = (2, self.T, self.H, self.D)
        nsets = 8 if self.cuda else 2
        g = torch.Generator().manual_seed(7)
        kvs = [torch.randn(shape, generator=g).to(self.dtype).to(self.device) for _ in range(nsets)]
        raw = kvs[0].numel() * kvs[0].element_size()
        out.update(shape=list(shape), dtype=str(self.dtype).removeprefix("torch."), raw_bytes=raw, rows=[],
                   inputs_rotated=nsets, role="encode" if self.rank == 0 else "decode")
        iters, warm = (a["codec_iters"], 5) if self.cuda else (a["codec_iters"], 1)
        for name in a["codecs"]:
            c = get_codec(name)
            nb = c.payload_nbytes(shape, self.dtype)
            row = dict(codec=name, payload_bytes=nb, ratio=c.compression_ratio(shape, self.dtype))
            i = [0]
            if self.rank == 0:
                def enc():
                    i[0] += 1
                    return c.encode(kvs[i[0] % nsets])
                row["encode"] = common.summarize(common.time_device(enc, self.device, iters, warm))
                row["encode_bytes_per_s"] = raw / row["encode"]["median_s"]
            else:
                payloads = [c.encode(kv) for kv in kvs]

                def dec():
                    i[0] += 1
                    return c.decode(payloads[i[0] % nsets], shape, self.dtype)
                row["decode"] = common.summarize(common.time_device(dec, self.device, iters, warm))
                row["decode_bytes_per_s"] = raw / row["decode"]["median_s"]
                kv = kvs[1]
                got, ok = c.decode(c.encode(kv), shape, self.dtype)
                ref = kv.double()
                row["rel_err"] = float((got.double() - ref).norm() / ref.norm())
                row["checksum_ok"] = bool(ok)
                bad = payloads[0].clone()
                bad[nb // 3] ^= 1
                row["corruption_detected"] = not bool(c.decode(bad, shape, self.dtype)[1])
                del payloads
            out["rows"].append(row)
            t = row.get("encode", row.get("decode"))
            log(self.rank, f"codec {name}: {out['role']} {t['median_s'] * 1e6:.1f} us, ratio {row['ratio']:.2f}"
                           + (f", rel err {row['rel_err']:.2e}, ok {row['checksum_ok']}" if self.rank == 1 else ""))

    # ------------------------------------------------------------------ 3. e2e streaming
    def _layer_kv(self, layer: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 + layer)
        return torch.randn(2, self.T, self.H, self.D, generator=g).to(self.dtype).to(self.device)

    def sec_e2e(self, out: dict) -> None:
        from kvtransfer.codec import get_codec
        from kvtransfer.transfer import KVReceiver, KVSender, _SendPlan, slot_mapping
        from disagg.kernels import get_kernels
        a, L, T, H, D = self.a, self.L, self.T, self.H, self.D
        bs = 16
        nblk = -(-T // bs)
        total_blocks = 2 * nblk + 3
        perm = torch.randperm(total_blocks, generator=torch.Generator().manual_seed(11 + self.rank)).tolist()
        table = perm[:nblk]
        slots = slot_mapping([table], [T], bs, self.device)
        caches = [(torch.empty(total_blocks, bs, H, D, dtype=self.dtype, device=self.device),
                   torch.empty(total_blocks, bs, H, D, dtype=self.dtype, device=self.device)) for _ in range(L)]
        check_layers = sorted({0, L - 1})
        expect = {}
        if self.rank == 0:
            dg = torch.Generator(device=self.device).manual_seed(5)
            for layer, (kc, vc) in enumerate(caches):
                kc.normal_(generator=dg)
                vc.normal_(generator=dg)
                kv = self._layer_kv(layer) if layer in check_layers else None
                if kv is not None:
                    kc.view(-1, H, D)[slots] = kv[0]
                    vc.view(-1, H, D)[slots] = kv[1]
        else:
            for layer in check_layers:
                expect[layer] = self._layer_kv(layer)
        kernels = get_kernels()
        raw_layer = 2 * T * H * D * torch.empty((), dtype=self.dtype).element_size()
        out.update(layers=L, tokens=T, raw_bytes=raw_layer * L, rows=[], kernels=kernels.name,
                   role="send" if self.rank == 0 else "receive")
        runs, warm = a["e2e_runs"], a["e2e_warmup"]
        for name in a["codecs"]:
            codec = get_codec(name)
            wire_layer = codec.payload_nbytes((2, T, H, D), self.dtype)
            link = RecordingChannel(self.link)
            row = dict(codec=name, wire_bytes=wire_layer * L, runs=runs)
            per = []
            if self.rank == 0:
                sender = KVSender(link, codec, H, D)
            else:
                receiver = KVReceiver(link, codec, kernels, caches, H, D, self.dtype, self.device)
            for i in range(warm + runs):
                tag = f"{name}/{i}"
                if self.rank == 0:
                    self.sync()
                    self.ctl.barrier(tag)
                    t0 = now_wall()
                    sender.begin([_SendPlan(1, slots)])
                    for layer in range(L):
                        sender.on_layer(layer, *caches[layer])
                    sender.end()
                    t_issued = now_wall()
                    self.ctl.wait_until(link.all_completed)
                    t_sent = now_wall()
                    sender.reap(block=True)
                    self.ctl.put(f"{tag}/t0", t0)
                    per.append(dict(issue_s=t_issued - t0, sent_s=t_sent - t0))
                else:
                    for kc, vc in caches:                 # poison what the transfer must overwrite
                        kc.view(-1, H, D)[slots] = float("nan")
                        vc.view(-1, H, D)[slots] = float("nan")
                    self.sync()
                    receiver.post(0, i, ["e2e"], [T], slots)
                    self.ctl.barrier(tag)
                    if i == 1:
                        self.inject("e2e")
                    done = receiver.poll()
                    while not done:
                        self.ctl.check()
                        self.ctl.relax()
                        done = receiver.poll()
                    t1 = now_wall()
                    ok = done[0][1]
                    t0 = self.ctl.get(f"{tag}/t0")
                    nan = sum(int(torch.isnan(kc.view(-1, H, D)[slots]).sum() + torch.isnan(vc.view(-1, H, D)[slots]).sum())
                              for kc, vc in caches)
                    errs = []
                    for layer in check_layers:
                        kc, vc = caches[layer]
                        got = torch.stack((kc.view(-1, H, D)[slots], vc.view(-1, H, D)[slots])).double()
                        ref = expect[layer].double()
                        errs.append(float((got - ref).norm() / ref.norm()))
                    per.append(dict(e2e_s=t1 - t0, ok=bool(ok), unwritten=nan, rel_err=max(errs)))
                    if not ok or nan or (codec.lossless and max(errs) != 0.0):
                        raise RuntimeError(f"{name} run {i}: checksum ok {ok}, {nan} unwritten elements, "
                                           f"rel err {max(errs):.3e}")
            m = per[warm:]
            if self.rank == 0:
                row.update(issue=common.summarize([x["issue_s"] for x in m]),
                           sent=common.summarize([x["sent_s"] for x in m]))
                log(0, f"e2e {name}: sends issued {row['issue']['median_s'] * 1e3:.2f} ms, "
                       f"all sent {row['sent']['median_s'] * 1e3:.2f} ms after the first encode")
            else:
                e2e = common.summarize([x["e2e_s"] for x in m])
                row.update(e2e=e2e, effective_bytes_per_s=raw_layer * L / e2e["median_s"],
                           wire_bytes_per_s=wire_layer * L / e2e["median_s"],
                           all_ok=all(x["ok"] for x in per), max_rel_err=max(x["rel_err"] for x in per),
                           unwritten=sum(x["unwritten"] for x in per))
                log(1, f"e2e {name}: {e2e['median_s'] * 1e3:.2f} ms, effective "
                       f"{row['effective_bytes_per_s'] / 1e9:.2f} GB/s (wire {row['wire_bytes_per_s'] / 1e9:.2f}), "
                       f"ok {row['all_ok']}, rel err {row['max_rel_err']:.2e}")
            row["per_run"] = per
            out["rows"].append(row)
        del caches, expect

    # ------------------------------------------------------------------ 4. handoff
    def sec_handoff(self, out: dict) -> None:
        from benchmarks.bench_engine import write_model_dir
        from decode.block_manager import BlockManager
        from decode.scheduler import Scheduler
        from disagg.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
        from disagg.engine.model_runner import ModelRunner
        from kvtransfer.codec import get_codec
        from kvtransfer.transfer import KVReceiver, KVSender, slot_mapping
        a, T = self.a, self.T
        if not self.cuda and a["shape"] == "llama3-8b":
            raise RuntimeError("the handoff section on CPU needs a small --shape (tiny)")
        bs = 16
        max_len = max(4096, -(-(T + 64) // 1024) * 1024)
        need = -(-(T + 1) // bs)
        num_blocks = 2 * need + 16
        model_dir = write_model_dir(a["shape"], self.dtype)
        mc = ModelConfig.from_dir(model_dir)
        L, H, D = mc.num_layers, mc.num_kv_heads, mc.head_dim
        cfg = EngineConfig(model_dir=model_dir, load_format="dummy", device=str(self.device),
                           use_cuda_graphs=self.rank == 1,
                           cache=CacheConfig(block_size=bs, num_blocks=num_blocks),
                           scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=max(T, 2048),
                                                     max_model_len=max_len))
        t0 = time.perf_counter()
        runner = ModelRunner(cfg, mc, max_len)
        self.sync()
        out.update(model_init_s=time.perf_counter() - t0, layers=L, tokens=T, kernels=runner.kernels.name,
                   cuda_graphs=sorted(runner.graphs), role="prefill" if self.rank == 0 else "decode", rows=[])
        log(self.rank, f"handoff: {a['shape']} runner ready in {out['model_init_s']:.1f} s "
                       f"(graphs {sorted(runner.graphs)})")
        self.ctl.barrier("models")
        prompt = torch.randint(0, mc.vocab_size, (T,), generator=torch.Generator().manual_seed(3)).tolist()
        runs, warm = a["handoff_runs"], a["handoff_warmup"]
        if self.rank == 1:
            bm = BlockManager(runner.num_blocks, bs)
            sch = Scheduler(cfg.scheduler, bm, max_len)
        else:
            table = list(range(need))
            slots = slot_mapping([table], [T], bs, self.device)
        for name in a["handoff_codecs"]:
            codec = get_codec(name)
            link = RecordingChannel(self.link)
            per = []
            if self.rank == 0:
                sender = KVSender(link, codec, H, D)
            else:
                receiver = KVReceiver(link, codec, runner.kernels, runner.kv_caches, H, D, runner.dtype,
                                      runner.device)
            for i in range(warm + runs):
                tag = f"{name}/{i}"
                rid = f"h-{name}-{i}"
                if self.rank == 0:
                    per.append(self._handoff_prefill(runner, sender, link, rid, prompt, table, slots, tag, L,
                                                     check=(i == warm)))
                else:
                    per.append(self._handoff_decode(runner, bm, sch, receiver, link, rid, prompt, tag, T, L,
                                                    check=(i == warm)))
            row = dict(codec=name, runs=runs, per_run=per)
            m = per[warm:]
            if self.rank == 0:
                row["prefill_forward"] = common.summarize([x["forward_s"] for x in m])
                row["prefill_step"] = common.summarize([x["step_s"] for x in m])
                log(0, f"handoff {name}: prefill forward {row['prefill_forward']['median_s'] * 1e3:.2f} ms "
                       f"(to the last hook), step {row['prefill_step']['median_s'] * 1e3:.2f} ms")
            else:
                for k in ("handoff_s", "handoff_from_kv_written_s", "kv_landed_s", "token_s", "decode_step_s",
                          "receive_wait_s"):
                    row[k.removesuffix("_s")] = common.summarize([x[k] for x in m])
                row["all_ok"] = all(x["ok"] for x in per)
                chk = [x for x in per if "next_token_match" in x]
                row["next_token_match"] = chk[0]["next_token_match"] if chk else None
                row["target_s"] = HANDOFF_TARGET_S
                row["meets_target"] = row["handoff"]["median_s"] < HANDOFF_TARGET_S if self.cuda else None
                log(1, f"handoff {name}: {row['handoff']['median_s'] * 1e3:.3f} ms median (KV landed "
                       f"{row['kv_landed']['median_s'] * 1e3:.3f}, token {row['token']['median_s'] * 1e3:.3f}, "
                       f"step {row['decode_step']['median_s'] * 1e3:.3f}), ok {row['all_ok']}, "
                       f"next token match {row['next_token_match']}")
            out["rows"].append(row)
        del runner

    def _handoff_prefill(self, runner, sender, link, rid, prompt, table, slots, tag, L, check) -> dict:
        from decode.scheduler import ScheduledRequest, SchedulerOutput
        from disagg.request import Request, SamplingParams
        from kvtransfer.transfer import _SendPlan
        T = len(prompt)
        req = Request(rid, list(prompt), SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
        sched = SchedulerOutput([ScheduledRequest(req, T, list(table))])
        self.sync()
        self.ctl.barrier(tag)
        marks: dict = {}
        if self.cuda:
            ev = {k: torch.cuda.Event(enable_timing=True) for k in ("ref", "start", "kv_written", "hook_done")}
            ta = now_wall()
            ev["ref"].record()
            ev["ref"].synchronize()
            t_ref = (ta + now_wall()) / 2

            def mark(k):
                ev[k].record()
        else:
            def mark(k):
                marks[k] = now_wall()

        def hook(layer, kc, vc):
            if layer == L - 1:
                mark("kv_written")
            sender.on_layer(layer, kc, vc)
            if layer == L - 1:
                mark("hook_done")
        mark("start")
        t_step0 = now_wall()
        sender.begin([_SendPlan(1, slots)])
        try:
            res = runner.execute(sched, layer_hook=hook)
        finally:
            sender.end()
        tok = res.sampled[rid]
        tok_t = torch.tensor([tok], dtype=torch.long, device=self.device)
        link.isend(tok_t, 1, tag=TAG_TOK)
        t_step1 = now_wall()
        self.ctl.wait_until(link.all_completed)
        sender.reap(block=True)
        if self.cuda:
            ev["hook_done"].synchronize()
            for k in ("start", "kv_written", "hook_done"):
                marks[k] = t_ref + ev["ref"].elapsed_time(ev[k]) / 1e3
        r = dict(t_start=marks["start"], t_kv_written=marks["kv_written"], t_hook_done=marks["hook_done"],
                 token=tok, forward_s=marks["hook_done"] - marks["start"], step_s=t_step1 - t_step0)
        self.ctl.put(f"{tag}/a", r)
        if check:
            # reference next token: a colocated decode step over the prefill's own (exact) KV
            req2 = Request(rid, list(prompt), SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
            req2.output_token_ids.append(tok)
            req2.num_computed_tokens = T
            s2 = SchedulerOutput([ScheduledRequest(req2, 1, list(table))])
            self.ctl.put(f"{tag}/ref_next", runner.execute(s2).sampled[rid])
        return r

    def _handoff_decode(self, runner, bm, sch, receiver, link, rid, prompt, tag, T, L, check) -> dict:
        from disagg.request import Request, SamplingParams
        from kvtransfer.transfer import slot_mapping
        if bm.allocate_slots(rid, T + 1) is None:           # LLMEngine.reserve
            raise RuntimeError("decode cache full")
        slots = slot_mapping([bm.block_table(rid)], [T], bm.block_size, self.device)
        for kc, vc in runner.kv_caches:                     # poison the reserved slots
            kc.view(-1, *kc.shape[2:])[slots] = float("nan")
            vc.view(-1, *vc.shape[2:])[slots] = float("nan")
        self.sync()
        receiver.post(0, 0, [rid], [T], slots)              # before the prefill starts
        tok_buf = torch.zeros(1, dtype=torch.long, device=self.device)
        tw = link.irecv(tok_buf, 0, tag=TAG_TOK)
        self.ctl.barrier(tag)
        self.inject("handoff")
        t_posted = now_wall()
        done = receiver.poll()
        while not done:
            self.ctl.check()
            self.ctl.relax()
            done = receiver.poll()
        t_kv = now_wall()
        ok = done[0][1]
        self.ctl.wait_until(tw.is_completed)
        tw.wait()
        tok = int(tok_buf.item())
        t_tok = now_wall()
        # LLMEngine.add_prefilled + step
        req = Request(rid, list(prompt), SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        req.output_token_ids.append(tok)
        req.num_computed_tokens = T if ok else 0
        sch.waiting.append(req)
        so = sch.schedule()
        res = runner.execute(so)
        finished = sch.update(so, res.sampled)
        t_step = now_wall()
        if not ok:
            raise RuntimeError(f"{tag}: KV checksum failed")
        if [r.request_id for r in finished] != [rid] or bm.has(rid):
            raise RuntimeError(f"{tag}: the request did not finish after one decode step")
        if so.num_decode != 1 or len(so.scheduled) != 1:
            raise RuntimeError(f"{tag}: expected one decode, got {len(so.scheduled)} scheduled")
        nxt = res.sampled[rid]
        a = self.ctl.get(f"{tag}/a")
        if a["token"] != tok:
            raise RuntimeError(f"{tag}: first token {tok} != prefill's {a['token']}")
        r = dict(ok=bool(ok), token=tok, next_token=nxt,
                 handoff_s=t_step - a["t_hook_done"], handoff_from_kv_written_s=t_step - a["t_kv_written"],
                 kv_landed_s=t_kv - a["t_hook_done"], token_s=t_tok - a["t_hook_done"],
                 decode_step_s=t_step - t_tok, receive_wait_s=t_kv - t_posted)
        if check:
            r["next_token_match"] = nxt == self.ctl.get(f"{tag}/ref_next")
        return r


def child_main(rank: int, a: dict, store_port: int, init_port: int, deadline_wall: float) -> None:
    try:
        r = Rank(rank, a, store_port, init_port, deadline_wall)
    except BaseException as e:  # noqa: BLE001
        tb = traceback.format_exc()
        print(f"[bench_kvtransfer r{rank}] init failed:\n{tb}", file=sys.stderr, flush=True)
        try:
            st = dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=timedelta(seconds=30),
                               wait_for_workers=False)
            st.set(f"errors/{rank}", json.dumps([dict(rank=rank, section="init", error=f"{type(e).__name__}: {e}",
                                                      traceback=tb)]))
            st.set(f"dead/{rank}", "1")
        except Exception:  # noqa: BLE001
            pass
        sys.exit(2)
    r.run()
    ok = not r.errors
    if ok:
        threading.Timer(15.0, os._exit, args=(0,)).start()     # a teardown that hangs must not hold the run
        try:
            r.ch.close()
        except Exception:  # noqa: BLE001
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if ok else 1)         # no interpreter teardown of NCCL state left by a failed section


# ====================================================================== parent
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", choices=("nccl", "gloo"), default=None, help="default: nccl on GPU, gloo on CPU")
    ap.add_argument("--label", default=None, help="run label, stored in the JSON and its name (default: backend)")
    ap.add_argument("--quick", action="store_true", help="fewer iterations (CPU: small sizes)")
    ap.add_argument("--handoff", action="store_true", help="also run the prefill -> decode handoff (section 4)")
    ap.add_argument("--shape", default="llama3-8b", help="model shape from bench_engine.SHAPES (tiny on CPU)")
    ap.add_argument("--tokens", type=int, default=None, help="prompt tokens (default 2048; CPU 256)")
    ap.add_argument("--sections", default=None, help=f"comma list of {','.join(SECTIONS)}")
    ap.add_argument("--codecs", default="none,fp8,int8,int4")
    ap.add_argument("--handoff-codecs", default=None, help="default: the --codecs list")
    ap.add_argument("--sizes", default=None, help="bandwidth message sizes in bytes, comma list "
                                                  "(default GPU 1M,16M,256M,2G; CPU 64K,1M,16M)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None)
    ap.add_argument("--deadline-s", type=float, default=480.0, help="whole run; children are killed after it")
    ap.add_argument("--gloo-yield-s", type=float, default=2e-5,
                    help="gloo: sleep this long in each polling spin so the channel's waiter threads get the GIL "
                         "(negative: pure busy spin, as the workers poll)")
    ap.add_argument("--force-staged", action="store_true", help="gloo on CPU: go through the staged channel anyway "
                                                                 "(tests that path without a GPU)")
    ap.add_argument("--results-dir", default=common.RESULTS_DIR)
    a = ap.parse_args(argv)
    if a.device is None:
        a.device = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= 2 else "cpu"
        if a.device == "cpu" and torch.cuda.is_available():
            log(None, f"only {torch.cuda.device_count()} GPU visible: running both ranks on the CPU")
    elif a.device == "cuda" and torch.cuda.device_count() < 2:
        ap.error(f"--device cuda needs 2 GPUs; {torch.cuda.device_count()} visible")
    a.backend = a.backend or ("nccl" if a.device == "cuda" else "gloo")
    if a.device == "cpu" and a.backend == "nccl":
        ap.error("nccl needs two GPUs; use --backend gloo on CPU")
    a.label = a.label or a.backend
    gpu = a.device == "cuda"
    a.tokens = a.tokens or (2048 if gpu else 256)
    secs = a.sections.split(",") if a.sections else ["bandwidth", "codecs", "e2e"] + (["handoff"] if a.handoff else [])
    bad = [s for s in secs if s not in SECTIONS]
    if bad:
        ap.error(f"unknown sections {bad}")
    a.sections = [s for s in SECTIONS if s in secs]
    a.codecs = a.codecs.split(",")
    a.handoff_codecs = a.handoff_codecs.split(",") if a.handoff_codecs else a.codecs
    if a.sizes:
        mult = {"K": KiB, "M": MiB, "G": GiB}
        a.sizes = [int(s[:-1]) * mult[s[-1].upper()] if s[-1].upper() in mult else int(s) for s in a.sizes.split(",")]
    else:
        a.sizes = [MiB, 16 * MiB, 256 * MiB, 2 * GiB] if gpu else [64 * KiB, MiB, 16 * MiB]
    q = a.quick
    a.bw_iters = (10 if q else 30) if gpu else (5 if q else 10)
    a.bw_target_s = (0.5 if q else 1.5) if gpu else 0.5     # seconds per (size, mode) on slow links
    a.codec_iters = (20 if q else 50) if gpu else (3 if q else 5)
    a.e2e_runs, a.e2e_warmup = ((4, 1) if q else (10, 2)) if gpu else ((3, 1) if q else (5, 1))
    a.handoff_runs, a.handoff_warmup = ((4, 2) if q else (10, 2)) if gpu else ((3, 1) if q else (5, 1))
    return a


def collect(store, a) -> dict:
    res = dict(info={}, sections={}, errors=[])
    for r in (0, 1):
        info = read_json_key(store, f"info/{r}")
        if info:
            res["info"][r] = info
        errs = read_json_key(store, f"errors/{r}")
        if errs:
            res["errors"].extend(errs)
        for s in a.sections:
            v = read_json_key(store, f"res/{r}/{s}")
            if v is not None:
                res["sections"].setdefault(s, {})[r] = v
    return res


def merge(a, col: dict, parent_errors: list) -> dict:
    info0 = col["info"].get(0) or col["info"].get(1) or {}
    out = dict(benchmark="kvtransfer", label=a.label, backend=a.backend, quick=a.quick, shape=a.shape,
               tokens=a.tokens, argv=sys.argv[1:], started=a.started, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               machine={k: v for k, v in info0.items() if k not in ("pid",)}, ranks=col["info"],
               sections={}, errors=col["errors"] + parent_errors)
    S = col["sections"]
    if "bandwidth" in S:
        b0 = S["bandwidth"].get(0, {})
        out["sections"]["bandwidth"] = dict(rows=b0.get("rows", []), method=b0.get("method"),
                                            errors={r: v.get("error") for r, v in S["bandwidth"].items() if "error" in v})
    if "codecs" in S:
        enc = {r["codec"]: r for r in S["codecs"].get(0, {}).get("rows", [])}
        dec = {r["codec"]: r for r in S["codecs"].get(1, {}).get("rows", [])}
        rows = []
        for c in a.codecs:
            if c in enc or c in dec:
                r = dict(codec=c)
                r.update(dec.get(c, {}))
                r.update(enc.get(c, {}))
                rows.append(r)
        meta = S["codecs"].get(1) or S["codecs"].get(0) or {}
        out["sections"]["codecs"] = dict(shape=meta.get("shape"), dtype=meta.get("dtype"),
                                         raw_bytes=meta.get("raw_bytes"), rows=rows)
    if "e2e" in S:
        snd = {r["codec"]: r for r in S["e2e"].get(0, {}).get("rows", [])}
        rcv = {r["codec"]: r for r in S["e2e"].get(1, {}).get("rows", [])}
        rows = []
        for c in a.codecs:
            if c in snd or c in rcv:
                r = dict(codec=c)
                r.update({k: v for k, v in rcv.get(c, {}).items() if k != "per_run"})
                r.update({k: v for k, v in snd.get(c, {}).items() if k != "per_run"})
                r["per_run_receiver"] = rcv.get(c, {}).get("per_run")
                r["per_run_sender"] = snd.get(c, {}).get("per_run")
                rows.append(r)
        meta = S["e2e"].get(1) or S["e2e"].get(0) or {}
        out["sections"]["e2e"] = dict(layers=meta.get("layers"), tokens=meta.get("tokens"),
                                      raw_bytes=meta.get("raw_bytes"), kernels=meta.get("kernels"), rows=rows)
        bw = out["sections"].get("bandwidth", {}).get("rows", [])
        variant = "staged" if any(r["variant"] == "staged" for r in bw) else "wire"
        best = max([max(r.get("single", {}).get("bytes_per_s", 0), r.get("stream", {}).get("bytes_per_s", 0))
                    for r in bw if r["variant"] == variant] or [0])
        if best:
            out["sections"]["e2e"]["link_bytes_per_s"] = best
            out["sections"]["e2e"]["link_variant"] = variant
            for r in rows:
                if "wire_bytes" in r:
                    r["link_floor_s"] = r["wire_bytes"] / best
    if "handoff" in S:
        pre = {r["codec"]: r for r in S["handoff"].get(0, {}).get("rows", [])}
        dec = {r["codec"]: r for r in S["handoff"].get(1, {}).get("rows", [])}
        rows = []
        for c in a.handoff_codecs:
            if c in pre or c in dec:
                r = dict(codec=c)
                r.update({k: v for k, v in dec.get(c, {}).items() if k != "per_run"})
                r.update({k: v for k, v in pre.get(c, {}).items() if k != "per_run"})
                r["per_run_decode"] = dec.get(c, {}).get("per_run")
                r["per_run_prefill"] = pre.get(c, {}).get("per_run")
                rows.append(r)
        h0, h1 = S["handoff"].get(0, {}), S["handoff"].get(1, {})
        out["sections"]["handoff"] = dict(tokens=h0.get("tokens") or h1.get("tokens"),
                                          layers=h0.get("layers") or h1.get("layers"),
                                          prefill_init_s=h0.get("model_init_s"), decode_init_s=h1.get("model_init_s"),
                                          decode_cuda_graphs=h1.get("cuda_graphs"), kernels=h1.get("kernels"),
                                          rows=rows)
    for s, by_rank in S.items():
        out["sections"].setdefault(s, {})["section_s"] = {r: v.get("section_s") for r, v in by_rank.items()}
    out["notes"] = dict(
        bandwidth="one-way rank 0 -> rank 1; time = go received -> reps messages + a 1-byte ack received "
                  "(host clock, completion polled), so small single messages include one ack latency",
        codecs="CUDA-event time per call (host timer on CPU), rotating over 8 inputs; encode on rank 0, decode "
               "(with checksum verify) on rank 1; rel_err = ||decode(encode(kv)) - kv|| / ||kv|| on N(0,1)",
        e2e="wall time from rank 0's first encode (GPU idle before) to rank 1's poll() reporting the plan "
            "complete (its checksum read syncs after the last write_kv); effective = raw bytes / that time; "
            "gloo on GPU includes device->host and host->device copies through pinned buffers",
        handoff="rank 0: CUDA events at the last layer's hook (kv_written before on_layer, hook_done after) "
                "mapped to the wall clock; rank 1: wall time when its first decode step over the received KV "
                "returned (sampled token on the host). handoff = that - hook_done. kv_landed, token: when rank 1 "
                "saw all layers in its cache / the first token. next_token_match: rank 1's decode token equals "
                "a colocated decode step on rank 0 (same dummy weights, exact KV)")
    return out


def print_table(res: dict) -> None:
    m = res.get("machine", {})
    lines = ["", "=" * 100,
             f"KV transfer benchmark | label {res['label']} | backend {res['backend']}"
             f"{' (staged via pinned host)' if m.get('staged') else ''} | {m.get('gpu') or 'CPU'} x2 | "
             f"torch {m.get('torch')} | nccl {m.get('nccl')} | p2p {m.get('p2p_access')}",
             f"env: {' '.join(f'{k}={v}' for k, v in (m.get('env') or {}).items()) or '(none)'} | shape {res['shape']}, "
             f"{res['tokens']} tokens{' | QUICK' if res['quick'] else ''}"]
    S = res["sections"]
    bw = S.get("bandwidth", {})
    if bw.get("rows"):
        lines += ["", "1. point-to-point, rank 0 -> rank 1 (one-way; single = 1 message + 1-byte ack; "
                      "stream = N back-to-back)",
                  f"{'variant':>8} {'size':>8} {'single ms':>10} {'single GB/s':>12} {'stream GB/s':>12} {'x':>4}"]
        for r in bw["rows"]:
            s, st = r.get("single", {}), r.get("stream")
            lines.append(f"{r['variant']:>8} {fmt_size(r['bytes']):>8} {s.get('median_s', float('nan')) * 1e3:>10.3f} "
                         f"{s.get('bytes_per_s', float('nan')) / 1e9:>12.2f} "
                         + (f"{st['bytes_per_s'] / 1e9:>12.2f} {st['reps']:>4}" if st else f"{'':>12} {'':>4}"))
    cd = S.get("codecs", {})
    if cd.get("rows"):
        lines += ["", f"2. codecs, one layer {cd.get('shape')} {cd.get('dtype')} = {cd.get('raw_bytes', 0) / MiB:.2f} MiB "
                      "(encode on rank 0, decode+verify on rank 1)",
                  f"{'codec':>6} {'payload MiB':>11} {'ratio':>6} {'enc us':>8} {'dec us':>8} {'enc GB/s':>9} "
                  f"{'dec GB/s':>9} {'rel err':>9} {'ok':>3} {'corrupt':>7}"]
        for r in cd["rows"]:
            e, d = r.get("encode", {}), r.get("decode", {})
            lines.append(f"{r['codec']:>6} {r.get('payload_bytes', 0) / MiB:>11.3f} {r.get('ratio', 0):>6.2f} "
                         f"{e.get('median_s', float('nan')) * 1e6:>8.1f} {d.get('median_s', float('nan')) * 1e6:>8.1f} "
                         f"{r.get('encode_bytes_per_s', float('nan')) / 1e9:>9.1f} "
                         f"{r.get('decode_bytes_per_s', float('nan')) / 1e9:>9.1f} {r.get('rel_err', float('nan')):>9.2e} "
                         f"{'y' if r.get('checksum_ok') else 'N':>3} {'y' if r.get('corruption_detected') else 'N':>7}")
    e2 = S.get("e2e", {})
    if e2.get("rows"):
        lines += ["", f"3. whole prompt streamed: {e2.get('layers')} layers x {e2.get('tokens')} tokens = "
                      f"{(e2.get('raw_bytes') or 0) / MiB:.1f} MiB raw; first encode -> last layer in the decode cache",
                  f"{'codec':>6} {'e2e ms':>8} {'eff GB/s':>9} {'wire GB/s':>9} {'sent ms':>8} {'link ms':>8} "
                  f"{'ok':>3} {'rel err':>9}"]
        for r in e2["rows"]:
            e = r.get("e2e", {})
            lines.append(f"{r['codec']:>6} {e.get('median_s', float('nan')) * 1e3:>8.2f} "
                         f"{r.get('effective_bytes_per_s', float('nan')) / 1e9:>9.2f} "
                         f"{r.get('wire_bytes_per_s', float('nan')) / 1e9:>9.2f} "
                         f"{r.get('sent', {}).get('median_s', float('nan')) * 1e3:>8.2f} "
                         f"{r.get('link_floor_s', float('nan')) * 1e3:>8.2f} "
                         f"{'y' if r.get('all_ok') else 'N':>3} {r.get('max_rel_err', float('nan')):>9.2e}")
        if e2.get("link_bytes_per_s"):
            lines.append("   link ms = wire bytes / best measured point-to-point bandwidth"
                         f" ({e2['link_variant']} {e2['link_bytes_per_s'] / 1e9:.1f} GB/s)")
    ho = S.get("handoff", {})
    if ho.get("rows"):
        lines += ["", f"4. handoff: prefill of {ho.get('tokens')} tokens ({ho.get('layers')} layers) on rank 0 -> "
                      "first decode step on rank 1; medians, ms after the prefill's last-layer hook",
                  f"{'codec':>6} {'handoff':>8} {'from KV':>8} {'KV in':>7} {'token':>7} {'step':>7} {'prefill':>8} "
                  f"{'ok':>3} {'next=':>5}  target < {HANDOFF_TARGET_S * 1e3:.0f} ms"]
        for r in ho["rows"]:
            g = lambda k: r.get(k, {}).get("median_s", float("nan")) * 1e3  # noqa: E731
            tgt = "" if r.get("meets_target") is None else ("ok" if r["meets_target"] else "MISS")
            lines.append(f"{r['codec']:>6} {g('handoff'):>8.3f} {g('handoff_from_kv_written'):>8.3f} "
                         f"{g('kv_landed'):>7.3f} {g('token'):>7.3f} {g('decode_step'):>7.3f} "
                         f"{g('prefill_forward'):>8.2f} {'y' if r.get('all_ok') else 'N':>3} "
                         f"{str(r.get('next_token_match'))[:5]:>5}  {tgt}")
        lines.append("   from KV = from the last layer's KV written (before its encode); prefill = forward start -> "
                     "last hook done")
    if res["errors"]:
        lines.append("")
        lines.append(f"ERRORS ({len(res['errors'])}): " + "; ".join(
            f"r{x.get('rank')} {x.get('section')}: {x.get('error')}" for x in res["errors"]))
    lines.append(f"json: {', '.join(res.get('json_paths', []))}")
    lines.append("=" * 100)
    print("\n".join(lines), flush=True)


def main(argv=None) -> int:
    a = parse_args(argv)
    a.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    from kvtransfer.channel import free_port
    try:
        store = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=60), wait_for_workers=False)
        assert store.port > 0
    except Exception:  # noqa: BLE001 - a torch whose TCPStore cannot pick its own port
        store = dist.TCPStore("127.0.0.1", free_port(), is_master=True, timeout=timedelta(seconds=60),
                              wait_for_workers=False)
    init_port = free_port()
    while init_port == store.port:
        init_port = free_port()
    t_start = time.time()
    deadline_wall = t_start + a.deadline_s
    log(None, f"device {a.device}, backend {a.backend}, label {a.label}, sections {a.sections}, "
              f"deadline {a.deadline_s:.0f} s")
    ad = {k: v for k, v in vars(a).items()}
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=child_main, args=(r, ad, store.port, init_port, deadline_wall), name=f"kvt-rank{r}")
             for r in (0, 1)]
    for p in procs:
        p.start()
    parent_errors = []
    marked = set()
    done_at = None
    while any(p.is_alive() for p in procs):
        for r, p in enumerate(procs):
            p.join(0.2)
            if p.exitcode not in (None, 0) and r not in marked:
                marked.add(r)
                if not store.check([f"done/{r}"]):      # exited early: its peer must stop waiting for it
                    store.set(f"dead/{r}", "1")
                if p.exitcode not in (1, 2):
                    parent_errors.append(dict(rank=r, section="process", error=f"rank {r} exited with {p.exitcode}"))
        if done_at is None and all(store.check([f"done/{r}"]) for r in (0, 1)):
            done_at = time.time()
        if done_at is not None and time.time() > done_at + 30:
            parent_errors.append(dict(rank=None, section="process", error="ranks did not exit 30 s after finishing"))
            break
        if time.time() > deadline_wall + 20:
            parent_errors.append(dict(rank=None, section="process", error=f"deadline of {a.deadline_s:.0f} s reached"))
            break
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
    res = merge(a, collect(store, a), parent_errors)
    res["wall_s"] = time.time() - t_start
    slug = res["machine"].get("slug") or ("cpu" if a.device == "cpu" else "unknown")
    label = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in a.label)
    try:
        res["json_paths"] = common.write_json(res, f"kvtransfer_{slug}_{label}.json", a.results_dir)
    except Exception as e:  # noqa: BLE001
        res["errors"].append(dict(rank=None, section="write json", error=f"{type(e).__name__}: {e}"))
    print_table(res)
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
