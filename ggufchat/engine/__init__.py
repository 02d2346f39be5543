"""The batch-first inference engine. Nothing above this package touches ctypes."""

from ggufchat.engine.embeddings import Embeddings, EmbeddingSpec
from ggufchat.engine.engine import Engine
from ggufchat.engine.loader import LoadOptions
from ggufchat.engine.sampling import SamplingParams
from ggufchat.engine.types import Delta, EngineStats, Finish, GenerationRequest, Usage, Vocabulary

__all__ = ["Engine", "LoadOptions", "SamplingParams", "GenerationRequest", "Delta", "Finish", "Usage",
           "EngineStats", "Vocabulary", "Embeddings", "EmbeddingSpec"]
