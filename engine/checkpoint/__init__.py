"""Sharded safetensors checkpoints: read one tensor at a time, write streaming and resumable shards."""

from engine.checkpoint.reader import CheckpointReader, TensorMeta
from engine.checkpoint.safetensors_format import TensorSpec
from engine.checkpoint.shard_plan import ShardPlan, plan_shards
from engine.checkpoint.writer import CheckpointWriter, ShardFile, write_checkpoint

__all__ = ["CheckpointReader", "TensorMeta", "TensorSpec", "CheckpointWriter", "ShardFile", "ShardPlan",
           "plan_shards", "write_checkpoint"]
