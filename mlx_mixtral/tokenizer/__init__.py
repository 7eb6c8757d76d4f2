"""Tokenizers of Mixtral/Mistral model directories: `load_tokenizer(model_dir) -> Tokenizer`.

core.py the Tokenizer, files.py finding and reading the tokenizer files, backends.py the
SentencePiece and `tokenizers` encoders, detokenizer.py streaming decoding, chat_template.py the
Mistral instruct formats and Jinja chat templates.
"""

from mlx_mixtral.errors import TokenizerError
from mlx_mixtral.tokenizer.core import Tokenizer
from mlx_mixtral.tokenizer.files import load_tokenizer

__all__ = ["Tokenizer", "TokenizerError", "load_tokenizer"]
