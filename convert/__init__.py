"""Convert Hugging Face, Mistral-native or MLX checkpoints into MLX model directories (mlx-lm's
format), streaming one layer at a time with optional (mixed-precision) quantization.

    from mlx_mixtral.convert import convert
    convert("mistralai/Mixtral-8x7B-Instruct-v0.1", "mixtral-4bit", quantize=True)
"""

from mlx_mixtral.convert.pipeline import Progress, convert
from mlx_mixtral.convert.quant import RECIPES
from mlx_mixtral.convert.shards import parse_size
from mlx_mixtral.errors import ConvertError

__all__ = ["ConvertError", "Progress", "RECIPES", "convert", "parse_size"]
