"""EngineConfig <-> plain dict, so configs cross process boundaries as data (no pickle of our types)."""
from __future__ import annotations

import dataclasses

from disagg.config import CacheConfig, EngineConfig, SchedulerConfig


def engine_config_to_dict(cfg: EngineConfig) -> dict:
    return dataclasses.asdict(cfg)


def engine_config_from_dict(d: dict) -> EngineConfig:
    d = dict(d)
    d["cache"] = CacheConfig(**d["cache"])
    d["scheduler"] = SchedulerConfig(**d["scheduler"])
    return EngineConfig(**d)
