"""mlx-mixtral: Mixtral sparse mixture-of-experts models on Apple Silicon with MLX."""

from mlx_mixtral.batching.api import batch_generate, stream_batch_generate
from mlx_mixtral.cache import KVCache, RotatingKVCache, load_prompt_cache, save_prompt_cache
from mlx_mixtral.chat import ChatSession
from mlx_mixtral.config import ModelArgs
from mlx_mixtral.errors import ContextLimitError, LoadError
from mlx_mixtral.generate import GenerationResponse, generate, generate_step, stream_generate
from mlx_mixtral.loader import load, load_model
from mlx_mixtral.model import Mixtral
from mlx_mixtral.sampling import make_logits_processors, make_sampler

__version__ = "0.1.0"

__all__ = [
    "batch_generate",
    "stream_batch_generate",
    "ChatSession",
    "ContextLimitError",
    "GenerationResponse",
    "KVCache",
    "LoadError",
    "Mixtral",
    "ModelArgs",
    "RotatingKVCache",
    "generate",
    "generate_step",
    "load",
    "load_model",
    "load_prompt_cache",
    "make_logits_processors",
    "make_sampler",
    "save_prompt_cache",
    "stream_generate",
]
