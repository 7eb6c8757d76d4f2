"""mlx-mixtral: Mixtral sparse mixture-of-experts models on Apple Silicon with MLX."""

from .cache import KVCache, RotatingKVCache, load_prompt_cache, save_prompt_cache
from .config import ModelArgs
from .loader import LoadError, load, load_model
from .chat import ChatSession, ContextLimitError
from .generate import GenerationResponse, generate, generate_step, stream_generate
from .model import Mixtral
from .sampling import make_logits_processors, make_sampler

__version__ = "0.1.0"
