"""Bringing a dead worker back: Ray restarts the actor, the cluster re-forms its groups and re-admits it.

Every worker actor is created with max_restarts = ClusterConfig.max_worker_restarts (0: a dead
worker stays dead). The router's side of a death is in cluster.py (DisaggEngine._mark_dead:
the rank leaves the dispatcher, its requests are retried on live workers); this module runs
beside it, one recovery at a time (a restarted rank must find its peers settled):

    DEAD        live peers abort their group with the rank (drop_peer: nothing waits on it)
       │        poll incarnation() until a fresh process answers          restart_timeout_s -> GIVEN UP
       │        (a process still alive whose loop failed is killed so that Ray restarts it;
       │         a rank past its restart budget stays dead)
       ▼
    REJOINING   epoch += 1; at once: the new process setup(epoch, peers = live peers) and
       │        each live peer reconnect(rank, epoch): both build the pair group under the
       │        new epoch, the peer swaps it in and forgets the old process's plans
       │        handshake checked against a live peer; start(codec) runs its loop
       ▼
    RING        (prefill leader or ring helper) when every member of the ring is alive:
       │        reform_ring(epoch) on all of them, then ring_up() on the leader
       ▼
    ADMITTED    out of the dead set, output poller started: the dispatcher routes to it again

A ring helper is not a router target: its death (seen by the health poll) takes the ring
down on its leader (ring_down: the leader prefills alone, a ring step in flight fails at
once; gloo fails it anyway, NCCL would wait for its timeout) until the helper is back.
"""
from __future__ import annotations

import asyncio
import time

import ray

from disagg.messages import decode
from kvtransfer.handshake import check_compatible


class Recovery:
    def __init__(self, eng, log):
        self.eng = eng
        self.log = log
        self.epoch = 0
        self.restarts = {"prefill": 0, "decode": 0, "prefill_cp": 0}
        self.recovering: set[int] = set()
        self.readmitted_at: dict[int, float] = {}    # rank -> time.monotonic() of its last re-admission
        self.dead_helpers: set[int] = set()
        self._lock: asyncio.Lock | None = None

    @property
    def enabled(self) -> bool:
        """Not with tensor parallelism yet: a TP worker's restart would have to re-form its whole
        TP group and every TP rank pair (its followers' deaths do reach _mark_dead via their leader)."""
        c = self.eng.cfg
        return c.max_worker_restarts > 0 and c.prefill_tp == 1 and c.decode_tp == 1

    def role(self, rank: int) -> str:
        e = self.eng
        if rank in e.prefill_ranks or rank in e.decode_ranks:
            return "prefill" if rank in e.prefill_ranks else "decode"
        return e.cfg.layout().role_of(rank)

    def handle(self, rank: int):
        return self.eng.actors.get(rank) or self.eng.helpers[rank]

    def live(self, ranks) -> list[int]:
        dead = self.eng.dispatcher.dead | self.dead_helpers
        return [r for r in ranks if r not in dead]

    def status(self) -> dict[str, str]:
        """rank -> "up", "restarting" or "dead" (for /health)."""
        dead = self.eng.dispatcher.dead | self.dead_helpers
        return {str(r): "up" if r not in dead else "restarting" if r in self.recovering else "dead"
                for r in [*self.eng.actors, *self.eng.helpers]}

    # ------------------------------------------------------------------ deaths
    async def check_helpers(self) -> None:
        """Ring helpers get no router traffic: a health call (from the load poller) tells whether
        each is still there."""
        live = self.live(self.eng.helpers)
        for r, h in zip(live, await asyncio.gather(*[self.eng.helpers[r].health.remote() for r in live],
                                                   return_exceptions=True)):
            if h is not None:
                self.log(f"  prefill_cp helper {r} failed: {str(h).splitlines()[0]}")
                self.on_death(r)

    def on_death(self, rank: int) -> None:
        """Called on the event loop once per death (DisaggEngine._mark_dead, or a helper's failed
        health check): abort the peers' groups with it, and start bringing it back."""
        c = self.eng.cfg
        if rank in self.eng.helpers and (c.prefill_tp > 1 or c.decode_tp > 1) and self.role(rank) != "prefill_cp":
            # a TP follower: its worker cannot step without it (the leader waits in a collective)
            self.dead_helpers.add(rank)
            leader = c.layout().worker_of(rank)[0]
            self.log(f"  TP follower {rank} of worker {leader} died")
            self.eng._mark_dead(leader, f"its TP follower {rank} died")
            return
        for peer in self.live(self.peers(rank)):
            self.handle(peer).drop_peer.remote(rank)
        for m in self.live(self.ring_members(rank)):     # the ring is down until every member is back
            if m != rank:
                self.handle(m).ring_down.remote()
        if rank in self.eng.helpers:
            self.dead_helpers.add(rank)
            self.log(f"  prefill_cp helper {rank} died: ring of prefill {self.leader_of(rank)} down")
        if not self.enabled or rank in self.recovering:
            return
        self.recovering.add(rank)
        self.eng._tasks.append(asyncio.get_running_loop().create_task(self._recover(rank)))

    def peers(self, rank: int) -> list[int]:
        """The ranks `rank` has a KV pair with (the channel's pairs)."""
        e = self.eng
        return e.decode_ranks if rank in e.prefill_ranks else e.prefill_ranks if rank in e.decode_ranks else []

    def leader_of(self, rank: int) -> int:
        c = self.eng.cfg
        return (rank - c.num_prefill - c.num_decode) // (c.prefill_cp - 1)

    def ring_members(self, rank: int) -> list[int]:
        """The ring group `rank` belongs to (leader first), or []."""
        e = self.eng
        if e.cfg.prefill_cp == 1 or rank in e.decode_ranks:
            return []
        leader = rank if rank in e.prefill_ranks else self.leader_of(rank)
        return [leader] + [h for h in e.helpers if self.leader_of(h) == leader]

    # ------------------------------------------------------------------ recovery
    async def _recover(self, rank: int) -> None:
        role, t0 = self.role(rank), time.monotonic()
        try:
            for _ in range(self.eng.cfg.max_worker_restarts):
                if not await self._wait_restarted(rank):
                    self.log(f"  {role} worker {rank} was not restarted: it stays dead")
                    return
                if self._lock is None:
                    self._lock = asyncio.Lock()
                async with self._lock:
                    try:
                        await self._rejoin(rank, role)
                        break
                    except Exception as e:  # noqa: BLE001 - e.g. a peer died meanwhile: restart it again
                        self.log(f"  {role} worker {rank}: rejoining failed ({type(e).__name__}: {e}); restarting it")
                        ray.kill(self.handle(rank), no_restart=False)
            else:
                self.log(f"  {role} worker {rank}: restart budget spent; it stays dead")
                return
            self.restarts[role] += 1
            self.readmitted_at[rank] = time.monotonic()
            self.log(f"  {role} worker {rank} re-admitted {time.monotonic() - t0:.1f}s after its death "
                     f"(epoch {self.epoch}, restart {self.restarts[role]} of role {role})")
        finally:
            self.recovering.discard(rank)

    async def _wait_restarted(self, rank: int) -> bool:
        """Until a fresh process answers for `rank`; False after restart_timeout_s or once Ray
        says the actor is gone for good."""
        actor = self.handle(rank)
        deadline = time.monotonic() + self.eng.cfg.restart_timeout_s
        killed, died_since = False, None
        while time.monotonic() < deadline:
            try:
                inc = await asyncio.wait_for(actor.incarnation.remote(), 10)
                if not inc["set_up"]:
                    return True
                if not killed:         # alive, but its loop failed: a restart is the way back
                    ray.kill(actor, no_restart=False)
                    killed = True
                died_since = None
            except ray.exceptions.ActorDiedError:
                died_since = died_since or time.monotonic()
                if time.monotonic() - died_since > 10:       # not restarting (budget spent, or killed for good)
                    return False
            except (ray.exceptions.RayError, asyncio.TimeoutError):
                died_since = None      # restarting: "temporarily unavailable"
            await asyncio.sleep(0.25)
        return False

    async def _rejoin(self, rank: int, role: str) -> None:
        e, c = self.eng, self.eng.cfg
        self.epoch += 1
        epoch = self.epoch
        actor = self.handle(rank)
        peers = self.live(self.peers(rank))
        ecfg, threads = e._setup_args
        await asyncio.gather(
            actor.setup.remote(ecfg, c.num_prefill, c.num_decode, e.store_addr, threads, c.prefill_cp, c.prefill_tp,
                               c.decode_tp,
                               epoch=epoch, peers=peers, loopback=c.address is None),
            *[e.actors[p].reconnect.remote(rank, epoch) for p in peers])
        if role != "prefill_cp" and peers:
            mine, theirs = await asyncio.gather(actor.handshake.remote(e.codec), e.actors[peers[0]].handshake.remote(e.codec))
            check_compatible(decode(mine), decode(theirs))
        if role == "prefill_cp":
            await actor.start.remote(e.codec, {})
        else:
            handles = {d: e.actors[d] for d in e.decode_ranks} if role == "prefill" else {}
            await actor.start.remote(e.codec, handles, c.transfer_timeout_s, c.kv_fault_rate,
                                     ring=e._ring_of(rank))       # the ring stays down until ring_up
        members = self.ring_members(rank)
        if members and len(self.live([m for m in members if m != rank])) == len(members) - 1:
            await asyncio.gather(*[self.handle(m).reform_ring.remote(epoch) for m in members])
            await e.actors[members[0]].ring_up.remote()
            self.log(f"  ring of prefill {members[0]} re-formed (epoch {epoch})")
        if rank in e.helpers:
            self.dead_helpers.discard(rank)
        else:
            e.readmit(rank)
