"""The KV channel's groups without a global world: a dead rank's replacement rejoins under a new epoch.

Three real processes (gloo, 127.0.0.1) and a store hosted here, as the driver hosts it:
prefill 0, decode 1 and prefill 0's ring helper 2 (P=1, D=1, cp=2).

    epoch 0   all three build their groups; 0 -> 1 KV message; a ring over {0, 2}
    d1 dies   0's receive posted on the old pair fails (no wait for the timeout)
    epoch 1   a new d1 builds its pair with 0 (peers={0}); 0 build_pair + install_pair; 1 -> 0 works
    h2 dies   (after its ring) a new h2 and 0 re-form the ring group under epoch 2; ring equals causal
"""
from __future__ import annotations

import torch
import torch.multiprocessing as mp

from kvtransfer.channel import ChannelConfig, KVChannel
from kvtransfer.groups import serve_store


def _cfg(rank: int, addr: str) -> ChannelConfig:
    return ChannelConfig(rank, 1, 1, addr, backend="gloo", timeout_s=60.0, prefill_cp=2)


def _ring_ok(group, rank: int) -> None:
    from prefill.ring_attention import causal_attention_reference, ring_attention, zigzag_slice
    g = torch.Generator().manual_seed(0)
    S, scale = 13, 0.25
    q, k, v = (torch.randn(S, h, 8, generator=g) for h in (4, 2, 2))
    out = ring_attention(*(zigzag_slice(x, 2, group.rank()) for x in (q, k, v)), S, scale, group=group)
    torch.testing.assert_close(out, zigzag_slice(causal_attention_reference(q, k, v, scale), 2, group.rank()),
                               atol=2e-5, rtol=1e-5)


def _prefill(addr: str) -> None:
    torch.set_num_threads(1)
    ch = KVChannel(_cfg(0, addr), torch.device("cpu"))
    ch.warmup()
    ch.isend(torch.full((4,), 7.0), 1, tag=1).wait()
    _ring_ok(ch.cp_group, 0)
    try:                                               # d1 dies without sending it: posting or waiting fails
        ch.irecv(torch.empty(4), 1, tag=2).wait()
        raise AssertionError("a receive from a dead peer completed")
    except RuntimeError:
        pass
    ch.install_pair(1, ch.build_pair(1, epoch=1))      # the new d1 builds its side meanwhile
    got = torch.empty(4)
    ch.irecv(got, 1, tag=3).wait()
    assert got.tolist() == [3.0] * 4
    ch.cp_group = ch.build_worker_group(epoch=2)       # with the new h2
    _ring_ok(ch.cp_group, 0)


def _decode(addr: str, epoch: int) -> None:
    import os
    torch.set_num_threads(1)
    ch = KVChannel(_cfg(1, addr), torch.device("cpu"), epoch=epoch, peers={0})
    ch.warmup()
    if epoch == 0:
        t = torch.empty(4)
        ch.irecv(t, 0, tag=1).wait()
        assert t.tolist() == [7.0] * 4
        os._exit(0)                                    # dies with the prefill's tag-2 receive pending
    ch.isend(torch.full((4,), 3.0), 0, tag=3).wait()


def _helper(addr: str, epoch: int) -> None:
    import os
    torch.set_num_threads(1)
    ch = KVChannel(_cfg(2, addr), torch.device("cpu"), epoch=epoch, peers=set())
    assert not ch.groups and ch.cp_group is not None
    if epoch == 0:
        ch.warmup()
    _ring_ok(ch.cp_group, 1)
    if epoch == 0:
        os._exit(0)


def _exit_after(body, *args) -> None:
    """Run a rank's body, then leave at once (a gloo process tearing down its groups at interpreter
    exit sometimes aborts, which says nothing about what was tested)."""
    import os
    import traceback
    try:
        body(*args)
    except BaseException:  # noqa: BLE001 - reported through the exit code
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def test_dead_ranks_rejoin_under_a_new_epoch():
    store, addr = serve_store("127.0.0.1", timeout_s=60.0)
    ctx = mp.get_context("spawn")
    p0 = ctx.Process(target=_exit_after, args=(_prefill, addr))
    d1 = ctx.Process(target=_exit_after, args=(_decode, addr, 0))
    h2 = ctx.Process(target=_exit_after, args=(_helper, addr, 0))
    procs = [p0, d1, h2]
    for p in procs:
        p.start()
    try:
        d1.join(120)
        d1b = ctx.Process(target=_exit_after, args=(_decode, addr, 1))
        d1b.start()
        procs.append(d1b)
        h2.join(120)
        h2b = ctx.Process(target=_exit_after, args=(_helper, addr, 2))
        h2b.start()
        procs.append(h2b)
        for p in (p0, d1b, h2b):
            p.join(120)
        assert [p.exitcode for p in procs] == [0] * 5
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
