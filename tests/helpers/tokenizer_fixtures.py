"""Tokenizer directories shaped like hub Mixtral checkpoints, built once per test process.

Each directory has the real Mixtral SentencePiece model (v1: 8x7B, v3: 8x22B) or the tokenizer.json
that transformers writes from it, a config.json saying model_type "mixtral" (so transformers picks
the same tokenizer class it picks for real Mixtral checkpoints), and ChatML tokens added the way
fine-tunes add them. The transformers tokenizer of each directory is the reference.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from functools import cache
from pathlib import Path

from helpers.tiny_models import mistral_tokenizer_path

CHATML = ("<|im_end|>", "<|im_start|>")
BASE_VOCAB = {"v1": 32000, "v3": 32768}
BYTE0 = {"v1": 3, "v3": 771}  # id of the byte piece <0x00>; <0xHH> is BYTE0 + 0xHH

# A corpus that exercises what breaks tokenizers: code, CJK, emoji (ZWJ sequences too), whitespace
# runs, leading spaces, newlines, tabs, control and rare bytes, combining marks, the meta-space
# character itself, markup that looks like special tokens, and special/added tokens proper.
CORPUS = [
    "Hello world",
    " Hello",
    "  two leading spaces",
    "trailing space ",
    "",
    " ",
    "   ",
    "\n",
    "\n\n\n",
    "a  b   c    d",
    "\t\ttabs\tand\nnewlines\r\n",
    "def f(x):\n    return x ** 2  # comment\n",
    "for (int i = 0; i < n; ++i) { s += a[i]; }",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "😀😃🤖 👩‍👩‍👧‍👦 🇫🇷 ✊🏽",
    "Emoji at end 🎉",
    "é è ê ë — “quotes” ‘single’ …",
    "e\u0301 a\u0308 n\u0303",
    "\u0000\u0001\u007f nul and del",
    "\u200b\u200d zero width",
    "\ufeffBOM",
    "▁meta▁space",
    "▁ starts",
    "math: ∑∫√∞ ≤ ≥ ≠ ≈ π",
    "RTL: مرحبا بالعالم שלום",
    "ﬁ ligature ＦＵＬＬＷＩＤＴＨ",
    "[INST] not a control token [/INST]",
    "<s> and </s> and <unk> inside",
    "x</s>y",
    "<s><s>",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "a<|im_start|>  b",
    "<|im_end|> lead",
    "[TOOL_CALLS] [AVAILABLE_TOOLS] [REFERENCE_DOC_3]",
    "1234567890 3.14159 1e-9 0x1F",
    "https://example.com/path?q=1&r=2#frag",
    '<html><body class="x">&amp;</body></html>',
    "\U0001f9ff\U0001fae0 rare emoji \U00010348 gothic \U0002a6d6 cjk ext",
    "\u0e01\u0e32\u0e23 thai",
]

_ROOT: Path | None = None


def _root() -> Path:
    global _ROOT
    if _ROOT is None:
        _ROOT = Path(tempfile.mkdtemp(prefix="mlx_mixtral_tok_"))
        atexit.register(shutil.rmtree, _ROOT, True)
    return _ROOT


def _added(content: str, special: bool = True, **flags) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "single_word": False,
        "special": special,
        **flags,
    }


def tokenizer_config(
    version: str,
    *,
    legacy: bool | None = True,
    chat_template: str | None = None,
    extra_added: dict[int, dict] | None = None,
) -> dict:
    n = BASE_VOCAB[version]
    added = {
        "0": _added("<unk>"),
        "1": _added("<s>"),
        "2": _added("</s>"),
        str(n): _added(CHATML[0]),
        str(n + 1): _added(CHATML[1]),
    }
    added.update({str(k): v for k, v in (extra_added or {}).items()})
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added,
    }
    if legacy is not None:
        config["legacy"] = legacy
    if chat_template is not None:
        config["chat_template"] = chat_template
    return config


def write_sp_dir(path: Path, version: str, config: dict | None, *, generation_eos=None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(mistral_tokenizer_path(version), path / "tokenizer.model")
    (path / "config.json").write_text(json.dumps({"model_type": "mixtral", "eos_token_id": 2}))
    if config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    if generation_eos is not None:
        (path / "generation_config.json").write_text(json.dumps({"eos_token_id": generation_eos}))
    return path


@cache
def hf_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@cache
def loaded_tokenizer(kind: str):
    """Our tokenizer of tokenizer_dir(kind), loaded once per test process."""
    from mlx_mixtral.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir(kind))


@cache
def tokenizer_dir(kind: str) -> Path:
    """kind: "<version>[-nonlegacy][-json|-both|-hubjson]", e.g. "v1", "v3-json", "v1-nonlegacy-both".

    "-json" directories hold only what transformers saves from the SentencePiece directory
    (tokenizer.json + tokenizer_config.json), like mlx-community conversions; "-both" keep
    tokenizer.model next to that tokenizer.json, like hub checkpoints; "-hubjson" rewrites the
    tokenizer.json pipeline the way older converters wrote it for the hub's Mistral/Mixtral repos
    (normalizer Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer).
    """
    version, *flags = kind.split("-")
    layout = flags[-1] if flags and flags[-1] in ("json", "both", "hubjson") else None
    if layout is not None:
        source = tokenizer_dir("-".join([version, *flags[:-1]]))
        path = _root() / kind
        hf_tokenizer(str(source)).save_pretrained(path)
        for name in ("config.json", "generation_config.json", "tokenizer.model"):
            shutil.copy(source / name, path / name)
        if layout != "both":
            (path / "tokenizer.model").unlink()
        if layout == "hubjson":
            spec = json.loads((path / "tokenizer.json").read_text())
            spec["normalizer"] = {
                "type": "Sequence",
                "normalizers": [
                    {"type": "Prepend", "prepend": "▁"},
                    {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
                ],
            }
            spec["pre_tokenizer"] = None  # user-defined pieces ([REFERENCE_DOC_n]) become added tokens instead
            pieces = spec["model"]["vocab"]
            known = {t["id"] for t in spec["added_tokens"]}
            spec["added_tokens"] += [
                {"id": pieces[p], "content": p, **_added(p, special=False)}
                for p in pieces
                if p.startswith("[REFERENCE_DOC_") and pieces[p] not in known
            ]
            spec["added_tokens"].sort(key=lambda t: t["id"])
            (path / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
        return path
    legacy = "nonlegacy" not in flags
    return write_sp_dir(
        _root() / kind, version, tokenizer_config(version, legacy=legacy), generation_eos=[2, BASE_VOCAB[version]]
    )
