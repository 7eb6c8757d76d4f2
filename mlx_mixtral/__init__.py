"""mlx-mixtral: Mixtral sparse mixture-of-experts models on Apple Silicon with MLX."""

from .cache import KVCache, RotatingKVCache, load_prompt_cache, save_prompt_cache
from .config import ModelArgs
from .loader import LoadError, load, load_model
from .model import Mixtral

__version__ = "0.1.0"
