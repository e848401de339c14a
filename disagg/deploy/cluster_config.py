"""The cluster's configuration: pool sizes, KV codec, dispatch and fault-handling settings.

One frozen dataclass, validated on construction; `disagg serve`'s cluster flags map onto its fields.
"""
from __future__ import annotations

from dataclasses import dataclass

from disagg.config import EngineConfig


@dataclass(frozen=True)
class ClusterConfig:
    engine: EngineConfig
    num_prefill: int = 1
    num_decode: int = 1
    kv_codec: str = "auto"
    address: str | None = None          # existing Ray cluster; None starts a local one
    reserve_timeout_s: float = 30.0     # how long a request may wait for decode KV before a 503
    use_gpus: bool | None = None        # None: when the Ray cluster has GPUs
    local_prefill: str = "auto"         # auto: cost-based (should_prefill_locally); never; always
    local_prefill_threshold: int = 256  # prompt tokens that ride along a decode step almost free
    transfer_timeout_s: float = 30.0    # a KV transfer not landed by then is re-dispatched
    kv_fault_rate: float = 0.0          # chaos testing only: flip a byte in this fraction of KV messages
    prefill_cp: int = 1                 # GPUs per prefill worker: prompts >= prefill_cp_min_tokens use ring attention
    prefill_cp_min_tokens: int = 4096
    prefill_routing: str = "cache_aware"   # cache_aware: weigh each worker's cached prefix (router.prefix_index)
                                           # against its load; least_loaded: the load alone
    prefill_tp: int = 1                 # GPUs per prefill worker (tensor parallelism)
    decode_tp: int = 1                  # GPUs per decode worker (tensor parallelism)
    max_worker_restarts: int = 3        # Ray restarts a dead worker this often; it rejoins (recovery.py); 0: stays dead
    restart_timeout_s: float = 120.0    # how long to wait for a restarted worker's process

    def __post_init__(self):
        if self.num_prefill < 0 or self.num_decode < 1:
            raise ValueError("--prefill must be at least 0 and --decode at least 1")
        if self.kv_codec not in ("auto", "none", "fp8", "int8", "int4"):
            raise ValueError("--kv-codec must be one of none, fp8, int8, int4, auto")
        if self.local_prefill not in ("auto", "never", "always"):
            raise ValueError("--local-prefill must be one of auto, never, always")
        if self.num_prefill == 0 and self.local_prefill == "never":
            raise ValueError("--local-prefill never needs a prefill pool (--prefill >= 1)")
        if self.local_prefill_threshold < 0:
            raise ValueError("--local-prefill-threshold must be >= 0")
        if self.prefill_cp < 1 or self.prefill_cp_min_tokens < 1:
            raise ValueError("--prefill-cp and --prefill-cp-min-tokens must be at least 1")
        if self.prefill_routing not in ("cache_aware", "least_loaded"):
            raise ValueError("--prefill-routing must be cache_aware or least_loaded")
        if self.prefill_tp < 1 or self.decode_tp < 1:
            raise ValueError("--prefill-tp and --decode-tp must be at least 1")
        if self.prefill_tp > 1 and self.prefill_cp > 1:
            raise ValueError("--prefill-tp and --prefill-cp cannot both exceed 1 (yet)")
        if self.max_worker_restarts < 0:
            raise ValueError("--max-worker-restarts must be >= 0")

    def check_model(self, mc) -> None:
        """The TP sizes must split the model's heads (disagg/model/tensor_parallel.check_tp)."""
        from disagg.model.tensor_parallel import check_tp
        for flag, tp, used in (("--prefill-tp", self.prefill_tp, self.num_prefill > 0),
                               ("--decode-tp", self.decode_tp, True)):
            if used and tp > 1:
                try:
                    check_tp(mc, tp)
                except ValueError as e:
                    raise ValueError(f"{flag} {tp}: {e}") from None

    def layout(self, num_kv_heads: int = 0):
        """The ranks of the cluster (kvtransfer.channel.ChannelConfig, seen from rank 0)."""
        from kvtransfer.channel import ChannelConfig
        return ChannelConfig(0, self.num_prefill, self.num_decode, "", prefill_cp=self.prefill_cp,
                             prefill_tp=self.prefill_tp, decode_tp=self.decode_tp, num_kv_heads=num_kv_heads)
