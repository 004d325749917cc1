"""Keel: the production layer for LLM applications."""

from keel.config import ConfigError, KeelConfig, load_config
from keel.engine import Keel
from keel.errors import KeelError
from keel.pipeline import Call, ChunkStream, Completion, Context, Pipeline, Reply, Stage

__all__ = [
    "Call", "ChunkStream", "Completion", "ConfigError", "Context", "Keel", "KeelConfig", "KeelError",
    "Pipeline", "Reply", "Stage", "load_config",
]
__version__ = "0.1.0"
