"""Run directories: configuration + hash, manifest, atomic Parquet parts, resume, sharding.

See :mod:`invariscope.runs.store` for the layout and conventions.
"""

from invariscope.runs.store import (
    RankInfo,
    RunStore,
    canonical_json,
    config_hash,
    part_id,
    rank_from_env,
    shard,
)

__all__ = [
    "RankInfo",
    "RunStore",
    "canonical_json",
    "config_hash",
    "part_id",
    "rank_from_env",
    "shard",
]
