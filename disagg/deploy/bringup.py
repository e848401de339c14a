"""Cluster bring-up decisions that need the running workers (DisaggEngine.launch)."""
from __future__ import annotations

import ray

from kvtransfer.codec_select import AUTO_CANDIDATES, choose_codec


def choose_cluster_codec(eng) -> None:
    """Set eng.codec, eng.codec_ratio and eng.link: the configured codec, or with --kv-codec auto the
    one whose per-layer handoff (encode + wire + decode) is cheapest on the measured link."""
    c = eng.cfg
    if not eng.prefill_ranks:       # colocated replicas: no KV moves
        eng.codec, eng.codec_ratio = "none", 1.0
        eng.log("  no prefill pool: every decode worker prefills its own requests")
        return
    p, d = eng.prefill_ranks[0], eng.decode_ranks[0]
    nbytes = 64 * 2**20 if c.use_gpus is not False else 16 * 2**20
    bw = ray.get([eng.actors[p].measure_bandwidth.remote(d, nbytes),
                  eng.actors[d].measure_bandwidth.remote(p, nbytes)])[0]
    eng.link = {"pair": [p, d], "bandwidth_bytes_per_s": bw}
    if c.kv_codec != "auto":
        eng.codec = c.kv_codec
        _set_codec_ratio(eng)
        eng.log(f"  KV link {p}->{d}: {bw / 1e9:.2f} GB/s; codec {eng.codec} (as asked)")
        return
    speeds = ray.get(eng.actors[p].codec_speed.remote(list(AUTO_CANDIDATES), 2048))
    eng.codec, times = choose_codec(speeds, bw)
    _set_codec_ratio(eng)
    eng.link["handoff_s"] = times
    eng.log(f"  KV link {p}->{d}: {bw / 1e9:.2f} GB/s; per-layer handoff "
            + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in times.items()) + f" -> codec {eng.codec}")


def _set_codec_ratio(eng) -> None:
    from kvtransfer.codec import get_codec
    mc = eng._mc
    eng.codec_ratio = get_codec(eng.codec).compression_ratio((2, 1024, mc.num_kv_heads, mc.head_dim),
                                                             eng.cfg.engine.torch_dtype)
