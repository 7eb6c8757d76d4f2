"""`Tokenizer`: text <-> token ids, chat prompts and streaming decoding for one model directory.

Built by `load_tokenizer` (files.py) from the files a model directory holds; the encoders are in
backends.py, streaming decoding in detokenizer.py, the chat formats in chat_template.py.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from mlx_mixtral.errors import ChatTemplateError
from mlx_mixtral.text import clean
from mlx_mixtral.tokenizer.backends import SentencePieceBackend, TokenizersBackend
from mlx_mixtral.tokenizer.chat_template import JINJA, MISTRAL_V1, MISTRAL_V3, encode_mistral, render_jinja
from mlx_mixtral.tokenizer.detokenizer import PieceDetokenizer, StreamingDetokenizer, WindowDetokenizer
from mlx_mixtral.tokenizer.tools import (
    GENERIC,
    TOOL_CALLS_TOKEN,
    check_tools,
    generic_messages,
    jinja_messages,
    tool_format,
)

CONTROL_TOKENS = (
    "[INST]",
    "[/INST]",
    TOOL_CALLS_TOKEN,
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
)
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer:
    """Text <-> token ids, chat prompts and streaming decoding for one model directory."""

    def __init__(
        self,
        backend: SentencePieceBackend | TokenizersBackend,
        *,
        special_tokens: Mapping[str, str],
        prefix: Sequence[int],
        suffix: Sequence[int],
        eos_token_id: int,
        extra_eos_ids: Sequence[int] = (),
        chat_templates: Mapping[str, str] | None = None,
        name: str = "",
    ):
        self._backend = backend
        self.special_tokens = dict(special_tokens)  # bos_token, eos_token, ... as strings (Jinja variables)
        self._prefix, self._suffix = list(prefix), list(suffix)
        bos = self.special_tokens.get("bos_token")
        self.bos_token_id: int | None = backend.token_to_id(bos) if bos is not None else None
        self.eos_token_id: int = eos_token_id
        self.eos_token_ids: frozenset[int] = frozenset([eos_token_id, *extra_eos_ids])
        self.vocab_size: int = backend.vocab_size
        self.chat_templates = dict(chat_templates or {})  # name -> Jinja source; "default" is the model's own
        self.name = name
        # Mistral's control tokens that this vocabulary has ([INST], [TOOL_CALLS], ...), for the v3 format.
        ids = {t: backend.token_to_id(t) for t in CONTROL_TOKENS}
        self._control_ids = {t: i for t, i in ids.items() if i is not None and i in backend.special_ids}

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.name!r}, {type(self._backend).__name__}, vocab_size={self.vocab_size}, "
            f"chat_template={self.chat_template_name!r})"
        )

    # --- text <-> ids ---------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True, *, bos: bool | None = None) -> list[int]:
        """Token ids of `text`. add_special_tokens=True adds what Hugging Face adds with the same
        option: BOS in front for Mistral/Mixtral, and EOS at the end if the tokenizer config asks for
        it. `bos` is this option's older name, still accepted. Added and special tokens written in
        the text (e.g. "</s>", "<|im_start|>") become their ids. A lone surrogate, which no UTF-8
        text holds, is encoded as U+FFFD (mlx_mixtral.text)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        special = add_special_tokens if bos is None else bos
        ids = self._backend.encode(clean(text))
        return [*self._prefix, *ids, *self._suffix] if special else ids

    def encode_fragment(self, text: str) -> list[int]:
        """Token ids of `text` as it would be tokenized in the middle of a longer text: no dummy-prefix
        space, no special tokens (what a grammar engine needs to tokenize forced text)."""
        return self._backend.encode_fragment(text)

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of token ids; special tokens (BOS, EOS, [INST], ...) are left out when skip_special.
        Ids the tokenizer does not have decode to nothing, as in Hugging Face's tokenizer."""
        return self._backend.decode([int(i) for i in ids], skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(int(token_id))

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for, as OpenAI's logprobs show a token: a byte-fallback piece
        (<0x0A>) is its one byte, SentencePiece's word-boundary mark a space, a special token its
        text; with a decoder of another family, the token decoded on its own."""
        table = self._backend.piece_table()
        i = int(token_id)
        if table is None:
            return self._backend.decode([i], False).encode("utf-8")
        if not 0 <= i < len(table.texts):
            return b""
        if table.byte_values[i] >= 0:
            return bytes([table.byte_values[i]])
        return (table.texts[i] or "").encode("utf-8")

    @property
    def special_ids(self) -> frozenset[int]:
        return self._backend.special_ids

    def detokenizer(self, skip_special: bool = True, continuation: bool = False) -> StreamingDetokenizer:
        """A fresh streaming decoder (one per generation): add_token(id) -> new text, finalize() -> rest.

        The chunks joined equal decode(ids). continuation=True decodes the tokens as the continuation
        of earlier text (a completion appended to its prompt): the first word keeps its leading space,
        which decode() drops at the start of a text.
        """
        table = self._backend.piece_table()
        if table is not None:
            return PieceDetokenizer(table, skip_special=skip_special, continuation=continuation)
        context = self._backend.encode("a") if continuation else ()
        return WindowDetokenizer(lambda ids: self._backend.decode(ids, skip_special), context=context)

    # --- chat -----------------------------------------------------------------------------------

    @property
    def chat_template_name(self) -> str:
        """The format used when none is asked for: the model's Jinja template if it has one, else
        mistral-v3 when the vocabulary has the [INST]/[/INST] control tokens, else mistral-v1."""
        if "default" in self.chat_templates:
            return JINJA
        return MISTRAL_V3 if {"[INST]", "[/INST]"} <= self._control_ids.keys() else MISTRAL_V1

    def tool_format(self, template: str | None = None) -> str:
        """How tools are written and called with this chat format (see tokenizer/tools.py): "mistral"
        with the v3 format, or a Jinja template that takes tools, on a vocabulary with [TOOL_CALLS];
        "generic" otherwise."""
        source = self._jinja_source(template)
        if source is not None and not _takes_tools(source):
            return GENERIC
        name = self.chat_template_name if template is None else template
        if source is None and name != MISTRAL_V3:
            return GENERIC
        return tool_format(set(self._control_ids))

    @property
    def tool_calls_id(self) -> int | None:
        """The id of the [TOOL_CALLS] control token, if the vocabulary has it."""
        return self._control_ids.get(TOOL_CALLS_TOKEN)

    def _jinja_source(self, template: str | None) -> str | None:
        """The Jinja source `template` stands for, or None for a built-in Mistral format."""
        name = self.chat_template_name if template is None else template
        if name in (MISTRAL_V1, MISTRAL_V3):
            return None
        if name == JINJA:
            name = "default"
        if name in self.chat_templates:
            return self.chat_templates[name]
        if "{{" in name or "{%" in name:
            return name
        if name == "default":
            raise ChatTemplateError(
                f"{self.name or 'this tokenizer'}: no Jinja chat template (chat_template in "
                f"tokenizer_config.json or chat_template.jinja); use mistral-v1 or mistral-v3"
            )
        known = [MISTRAL_V1, MISTRAL_V3, JINJA, *sorted(k for k in self.chat_templates if k != "default")]
        raise ChatTemplateError(f"unknown chat template {name!r}: expected one of {', '.join(known)} or Jinja source")

    def _with_tools(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None, template: str | None
    ) -> tuple[Sequence[Mapping[str, Any]], list[dict] | None]:
        """The messages and tools as the chat format takes them: the generic format rewrites both
        into plain messages; a Jinja template that takes tools gets call arguments as values."""
        tools = check_tools(tools) if tools else None
        uses_tools = tools or any(
            m.get("role") == "tool" or m.get("tool_calls") for m in messages if isinstance(m, Mapping)
        )
        if not uses_tools:
            return messages, None
        fmt = self.tool_format(template)
        if fmt == GENERIC:
            return generic_messages(messages, tools or []), None
        if self._jinja_source(template) is not None:
            return jinja_messages(messages, fmt), tools
        return messages, tools

    def render_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        template: str | None = None,
        *,
        continue_final_message: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **variables,
    ) -> str:
        """The prompt text of a Jinja chat template (the Mistral formats are token-level, not text)."""
        source = self._jinja_source(template)
        if source is None:
            raise ChatTemplateError("render_chat_template needs a Jinja template; the Mistral formats build tokens")
        messages, tools = self._with_tools(messages, tools, template)
        return render_jinja(
            source,
            messages,
            special_tokens=self.special_tokens,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            **({"tools": tools} if tools else {}),
            **variables,
        )

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        template: str | None = None,
        *,
        continue_final_message: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **variables,
    ) -> list[int]:
        """Token ids of a conversation [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...].

        template: None picks automatically (see chat_template_name); "mistral-v1", "mistral-v3",
        "jinja" (the model's template), the name of one of the model's templates, or Jinja source.
        Mistral formats follow mistral-common exactly; a conversation it rejects raises ValueError.
        add_generation_prompt=False allows a finished conversation (last answer closed with EOS);
        continue_final_message=True leaves the last assistant answer open for the model to continue.
        tools: OpenAI tool definitions; assistant messages may carry OpenAI `tool_calls` and `tool`
        messages answer them, in the format `tool_format(template)` names (see tokenizer/tools.py).
        """
        if self._jinja_source(template) is not None:
            text = self.render_chat_template(
                messages,
                add_generation_prompt,
                template,
                continue_final_message=continue_final_message,
                tools=tools,
                **variables,
            )
            # As transformers: the template writes BOS itself, so no special tokens are added here.
            return self.encode(text, add_special_tokens=False)
        messages, tools = self._with_tools(messages, tools, template)
        version = self.chat_template_name if template is None else template
        if self.bos_token_id is None:
            raise ChatTemplateError("the Mistral chat format needs a BOS token, which this tokenizer does not have")
        return encode_mistral(
            messages,
            version=version,
            encode=lambda part: self._backend.encode_raw(clean(part)),
            bos_id=self.bos_token_id,
            eos_id=self.eos_token_id,
            control_ids=self._control_ids,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        )


def _takes_tools(source: str) -> bool:
    """Whether a Jinja template reads the `tools` variable (transformers passes it to every template)."""
    return re.search(r"\btools\b", source) is not None
