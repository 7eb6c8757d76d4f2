"""`load_tokenizer(model_dir)`: the tokenizer of a model directory, as transformers would build it.

Files read (all optional except one of the first two):
  tokenizer.model (or Mistral's tokenizer.model.v*)   SentencePiece model, encoded with `sentencepiece`
  tokenizer.json                                       `tokenizers` pipeline; used when there is no
                                                       SentencePiece model (many mlx-community dirs),
                                                       else only for its added tokens and settings
  tokenizer_config.json, special_tokens_map.json,      bos/eos/unk/pad tokens, add_bos_token/add_eos_token,
  added_tokens.json                                    added tokens (added_tokens_decoder), legacy, chat_template
  chat_template.jinja                                  the chat template of newer transformers versions
  generation_config.json (else config.json)            extra end-of-sequence ids (eos_token_id: int or list)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlx_mixtral.errors import TokenizerError
from mlx_mixtral.tokenizer.backends import AddedToken, SentencePieceBackend, TokenizersBackend
from mlx_mixtral.tokenizer.core import NAMED_TOKENS, Tokenizer


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _added_token(token_id: Any, entry: Mapping, source: Path) -> AddedToken:
    try:
        return AddedToken(
            int(token_id),
            str(entry["content"]),
            special=bool(entry.get("special", False)),
            lstrip=bool(entry.get("lstrip", False)),
            rstrip=bool(entry.get("rstrip", False)),
            single_word=bool(entry.get("single_word", False)),
        )
    except (KeyError, TypeError, ValueError):
        raise TokenizerError(f"{source}: bad added token {token_id!r}: {dict(entry)!r:.120}") from None


def _added_tokens(model_dir: Path, tokenizer_json: dict, config: dict, special_names: set[str]) -> list[AddedToken]:
    """Added tokens by id; tokenizer.json first, then tokenizer_config.json, then added_tokens.json."""
    found: dict[int, AddedToken] = {}
    for entry in tokenizer_json.get("added_tokens", []):
        token = _added_token(entry.get("id"), entry, model_dir / "tokenizer.json")
        found.setdefault(token.id, token)
    for token_id, entry in (config.get("added_tokens_decoder") or {}).items():
        token = _added_token(token_id, entry, model_dir / "tokenizer_config.json")
        found.setdefault(token.id, token)
    path = model_dir / "added_tokens.json"
    for content, token_id in _read_json(path).items():
        token = _added_token(token_id, {"content": content, "special": content in special_names}, path)
        found.setdefault(token.id, token)
    return sorted(found.values(), key=lambda t: t.id)


def _pre_tokenizer_steps(tokenizer_json: dict) -> list[dict]:
    steps = []
    for key in ("normalizer", "pre_tokenizer"):
        step = tokenizer_json.get(key) or {}
        steps += step.get("normalizers") or step.get("pretokenizers") or [step]
    return steps


def _legacy(tokenizer_json: dict, config: dict) -> bool:
    """Whether every text run between added tokens gets the dummy prefix ("legacy") or only the first.
    A tokenizer.json decides (transformers uses it as is); else tokenizer_config.json's `legacy`."""
    for step in _pre_tokenizer_steps(tokenizer_json):
        if step.get("type") == "Prepend":
            return True
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always") == "always"
    return bool(config.get("legacy", True))


def _affixes(config: dict, tokenizer_json: dict, bos_id: int | None, eos_id: int) -> tuple[list[int], list[int]]:
    """What add_special_tokens=True adds: tokenizer_config.json's add_bos_token/add_eos_token when set
    (transformers then rebuilds the post-processor), else tokenizer.json's TemplateProcessing, else BOS."""
    if "add_bos_token" in config or "add_eos_token" in config:
        prefix = [bos_id] if config.get("add_bos_token", False) and bos_id is not None else []
        return prefix, ([eos_id] if config.get("add_eos_token", False) else [])
    processors = [tokenizer_json.get("post_processor") or {}]
    processors += processors[0].get("processors", [])
    for processor in processors:
        if processor.get("type") == "TemplateProcessing":
            prefix, suffix, seen_text = [], [], False
            for item in processor.get("single", []):
                if "Sequence" in item:
                    seen_text = True
                elif "SpecialToken" in item:
                    ids = processor["special_tokens"][item["SpecialToken"]["id"]]["ids"]
                    (suffix if seen_text else prefix).extend(ids)
            return prefix, suffix
    # No setting anywhere (a bare tokenizer.model): BOS, as SentencePiece Llama/Mistral models expect.
    return ([bos_id] if bos_id is not None else []), []


def _ids(value: Any, path: Path) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TokenizerError(f"{path}: eos_token_id must be an int or a list of ints, got {value!r}")
    return list(values)


def _chat_templates(model_dir: Path, config: dict) -> dict[str, str]:
    templates: dict[str, str] = {}
    value = config.get("chat_template")
    if isinstance(value, str):
        templates["default"] = value
    elif isinstance(value, list):  # [{"name": ..., "template": ...}, ...]
        templates.update({t["name"]: t["template"] for t in value if isinstance(t, Mapping) and "name" in t})
    extra = _read_json(model_dir / "chat_template.json").get("chat_template")
    if isinstance(extra, str):
        templates["default"] = extra
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():  # newer transformers save the template here; it wins
        templates["default"] = jinja_file.read_text(encoding="utf-8")
    return templates


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """The tokenizer of a model directory (see the module docstring for the files it reads)."""
    model_dir = Path(os.path.expanduser(model_dir))
    if not model_dir.is_dir():
        raise TokenizerError(f"{model_dir}: not a directory")
    config = _read_json(model_dir / "tokenizer_config.json")
    special_map = _read_json(model_dir / "special_tokens_map.json")
    json_path = model_dir / "tokenizer.json"
    tokenizer_json = _read_json(json_path)
    sp_files = [model_dir / "tokenizer.model"] + sorted(model_dir.glob("tokenizer.model.v*"), reverse=True)
    sp_path = next((p for p in sp_files if p.is_file()), None)

    special_tokens = {}
    for name in NAMED_TOKENS:
        value = _token_content(config[name]) if name in config else _token_content(special_map.get(name))
        if value is not None:
            special_tokens[name] = value
    special_names = set(special_tokens.values())
    for entry in config.get("additional_special_tokens") or special_map.get("additional_special_tokens") or []:
        if _token_content(entry) is not None:
            special_names.add(_token_content(entry))
    added = _added_tokens(model_dir, tokenizer_json, config, special_names)

    if sp_path is not None:
        try:
            backend = SentencePieceBackend(sp_path, added, legacy=_legacy(tokenizer_json, config))
        except (RuntimeError, OSError, ValueError) as e:
            raise TokenizerError(f"{sp_path}: cannot load the SentencePiece model ({e})") from None
        sp = backend.sp
        for name, piece_id in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("unk_token", sp.unk_id())):
            if name not in config and name not in special_map and piece_id >= 0:
                special_tokens[name] = sp.id_to_piece(piece_id)
    elif tokenizer_json:
        try:
            backend = TokenizersBackend(tokenizer_json, added, json_path)
        except Exception as e:  # the tokenizers library raises its own exception type
            raise TokenizerError(f"{json_path}: cannot load ({' '.join(str(e).split())})") from None
    else:
        raise TokenizerError(
            f"{model_dir}: no tokenizer found (looked for tokenizer.model, tokenizer.model.v*, tokenizer.json)"
        )

    gen_path = model_dir / "generation_config.json"
    if not gen_path.is_file():  # transformers derives the generation config from config.json then
        gen_path = model_dir / "config.json"
    extra_eos = _ids(_read_json(gen_path).get("eos_token_id"), gen_path)
    eos_text = special_tokens.get("eos_token")
    eos_id = backend.token_to_id(eos_text) if eos_text is not None else None
    if eos_id is None:
        eos_id = extra_eos[0] if extra_eos else backend.token_to_id("</s>")
    if eos_id is None:
        raise TokenizerError(
            f"{model_dir}: no end-of-sequence token (eos_token in tokenizer_config.json or "
            f"special_tokens_map.json, or eos_token_id in generation_config.json)"
        )
    bos_text = special_tokens.get("bos_token")
    bos_id = backend.token_to_id(bos_text) if bos_text is not None else None
    prefix, suffix = _affixes(config, tokenizer_json, bos_id, eos_id)
    return Tokenizer(
        backend,
        special_tokens=special_tokens,
        prefix=prefix,
        suffix=suffix,
        eos_token_id=eos_id,
        extra_eos_ids=extra_eos,
        chat_templates=_chat_templates(model_dir, config),
        name=str(model_dir),
    )
