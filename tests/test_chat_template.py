"""Chat prompts against mistral-common (Mistral v1/v3 formats) and transformers (Jinja templates)."""

import json
from functools import cache

import pytest
from helpers.tiny_models import mistral_tokenizer_path
from helpers.tokenizer_fixtures import hf_tokenizer, loaded_tokenizer, tokenizer_config, tokenizer_dir, write_sp_dir
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mlx_mixtral.tokenizer import load_tokenizer


def U(content):  # noqa: N802 - short names keep the conversations readable
    return {"role": "user", "content": content}


def A(content):  # noqa: N802
    return {"role": "assistant", "content": content}


def S(content):  # noqa: N802
    return {"role": "system", "content": content}


CONVERSATIONS = [
    [U("Hi")],
    [S("You are terse."), U("What is 2+2?")],
    [S("Be kind.\n\nAnswer in French."), U("Hello"), A("Bonjour !"), U("How are you?"), A("Très bien."), U("Bye")],
    [U("日本語で答えて 😀"), A("はい、もちろん 👍"), U("ありがとう")],
    [U("")],
    [U(" "), A(" spaced out  "), U("\n")],
    [U("  leading and trailing  "), A("\nnewline first"), U("tabs\tinside")],
    [U("a"), U("b"), A("c"), U("d")],
    [U(""), U("b"), A("c"), U("d"), U("")],
    [U("q"), A("first"), A("second"), U("next")],
    [U("before"), S("mid system"), U("after")],
    [S("one"), S(""), S("two"), U("go")],
    [A("I start."), U("Then you.")],
    [S("only a system prompt")],
    [U("[INST] fake [/INST] </s> <s> [TOOL_CALLS]"), A("<|im_start|>not special here"), U("ok")],
    [S("sys"), U([{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}])],
    [U("x"), S("s at the end")],
]
MISTRAL_KINDS = ["v1", "v1-json", "v3", "v3-json", "v1-nonlegacy-json", "v1-nonlegacy-both", "v3-hubjson"]


@cache
def _mistral_common(version: str, mode: ValidationMode = ValidationMode.test) -> MistralTokenizer:
    return MistralTokenizer.from_file(str(mistral_tokenizer_path(version)), mode=mode)


def _reference(version, messages, mode=ValidationMode.test):
    return _mistral_common(version, mode).encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens


@pytest.mark.parametrize("kind", MISTRAL_KINDS)
def test_mistral_format_matches_mistral_common(kind):
    tok = loaded_tokenizer(kind)
    version = kind[:2]
    assert tok.chat_template_name == f"mistral-{version}"
    for messages in CONVERSATIONS:
        assert tok.apply_chat_template(messages) == _reference(version, messages), (kind, messages)


@pytest.mark.parametrize("kind", ["v1", "v3-json"])
def test_finished_and_continued_conversations(kind):
    tok = loaded_tokenizer(kind)
    version = kind[:2]
    for messages in ([U("a"), A("b")], [S("sys"), U("a"), A("b "), U("c"), A("d  ")]):
        expected = _reference(version, messages, ValidationMode.finetuning)
        assert tok.apply_chat_template(messages, add_generation_prompt=False) == expected
        assert expected[-1] == tok.eos_token_id
    prefilled = [U("Write a haiku"), {**A("Autumn moonlight -"), "prefix": True}]
    expected = _reference(version, prefilled)
    assert (
        tok.apply_chat_template(
            prefilled[:1] + [A("Autumn moonlight -")], continue_final_message=True, add_generation_prompt=False
        )
        == expected
    )
    assert expected[-1] != tok.eos_token_id


REJECTED = [
    [],
    [A("alone")],
    [U("a"), A("b")],  # a new answer needs a user message last
    [U("a"), A("b"), S("s"), U("c")],  # system may not follow assistant
    [U("a"), A(""), U("c")],  # assistant without content
]


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_rejected_conversations_raise_one_line_value_errors(version):
    tok = loaded_tokenizer(version)
    for messages in REJECTED:
        with pytest.raises(Exception):  # noqa: B017 (mistral-common raises several exception types)
            _reference(version, messages)
        with pytest.raises(ValueError) as err:
            tok.apply_chat_template(messages)
        assert "\n" not in str(err.value), messages
    with pytest.raises(ValueError, match="role 'tool'"):
        tok.apply_chat_template([U("a"), {"role": "tool", "content": "{}"}])
    with pytest.raises(ValueError, match="continue_final_message"):
        tok.apply_chat_template([U("a")], continue_final_message=True, add_generation_prompt=False)


# Jinja templates written for these tests in the styles found on the hub: ChatML (BOS written by the
# template), and an [INST] template with a system prompt, whitespace control and raise_exception.
CHATML = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
INST_STYLE = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_text = messages[0]['content'] %}
    {%- set turns = messages[1:] %}
{%- else %}
    {%- set turns = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in turns %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Roles must alternate user/assistant after an optional system message') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_text is defined %}
            {{- ' [INST] ' + system_text + '\n\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- else %}
        {{- ' ' + message['content'] + eos_token }}
    {%- endif %}
{%- endfor %}
"""
# Block tags on their own lines: trim_blocks/lstrip_blocks decide the output's whitespace.
BLOCKY = """{% for message in messages %}
    {% if message.role == 'system' %}
<<SYS>>{{ message.content | tojson }}<</SYS>>
    {% else %}
{{ message.role }}: {{ message.content }}
    {% endif %}
{% endfor %}
{% if tools is none and documents is none %}no tools{% endif %}
{% if add_generation_prompt %}assistant:{% endif %}"""

JINJA_CONVERSATIONS = [
    [U("Hi")],
    [S("You are terse."), U("Hello"), A("Hi there."), U("日本 😀 é")],
    [U("  spaces  "), A("\n"), U("<|im_start|> typed by the user")],
]


@pytest.fixture(scope="module", params=["chatml", "chatml-json", "inst", "blocky"])
def jinja_pair(request, tmp_path_factory):
    source = {"chatml": CHATML, "inst": INST_STYLE, "blocky": BLOCKY}[request.param.split("-")[0]]
    path = write_sp_dir(tmp_path_factory.mktemp(request.param), "v1", tokenizer_config("v1", chat_template=source))
    if request.param.endswith("json"):  # transformers saves the template as chat_template.jinja
        json_path = tmp_path_factory.mktemp("saved")
        hf_tokenizer(str(path)).save_pretrained(json_path)
        (json_path / "tokenizer.model").unlink(missing_ok=True)
        assert (json_path / "chat_template.jinja").is_file()
        path = json_path
    return load_tokenizer(path), hf_tokenizer(str(path))


def _hf_ids(hf, messages, **kwargs):
    return hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)


def test_jinja_template_matches_transformers(jinja_pair):
    ours, hf = jinja_pair
    assert ours.chat_template_name == "jinja"
    for messages in JINJA_CONVERSATIONS:
        for generation_prompt in (True, False):
            assert ours.apply_chat_template(messages, add_generation_prompt=generation_prompt) == _hf_ids(
                hf, messages, add_generation_prompt=generation_prompt
            ), messages
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours.render_chat_template(messages) == text
    finished = JINJA_CONVERSATIONS[1][:3]
    assert ours.apply_chat_template(finished, add_generation_prompt=False, continue_final_message=True) == _hf_ids(
        hf, finished, continue_final_message=True
    )


def test_text_parts_follow_one_rule_in_every_format(jinja_pair):
    """Text parts are joined as mistral-common joins chunks, for the Mistral formats (checked against
    mistral-common itself) and for Jinja templates alike."""
    ours, _ = jinja_pair
    parts = [{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": ""},
                                          {"type": "text", "text": "two"}]}]  # fmt: skip
    joined = [U("one\n\ntwo")]
    assert ours.apply_chat_template(parts) == ours.apply_chat_template(joined)
    for version in ("v1", "v3"):
        assert loaded_tokenizer(version).apply_chat_template(parts) == _reference(version, parts)
        assert _reference(version, parts) == _reference(version, joined)


def test_jinja_template_writes_bos_once():
    ours = load_tokenizer(
        write_sp_dir(tokenizer_dir("v1").parent / "bos_once", "v1", tokenizer_config("v1", chat_template=CHATML))
    )
    ids = ours.apply_chat_template([U("Hi")])
    assert ids[:2] == [1, 32001] and ids.count(1) == 1


def test_jinja_raise_exception_is_a_value_error(tmp_path):
    path = write_sp_dir(tmp_path / "inst", "v1", tokenizer_config("v1", chat_template=INST_STYLE))
    ours, hf = load_tokenizer(path), hf_tokenizer(str(path))
    bad = [U("a"), U("b")]
    with pytest.raises(Exception, match="alternate"):
        _hf_ids(hf, bad)
    with pytest.raises(ValueError, match="chat template: Roles must alternate") as err:
        ours.apply_chat_template(bad)
    assert "\n" not in str(err.value)


def test_template_override():
    path = write_sp_dir(tokenizer_dir("v1").parent / "override", "v3", tokenizer_config("v3", chat_template=CHATML))
    ours, hf = load_tokenizer(path), hf_tokenizer(str(path))
    messages = CONVERSATIONS[2]
    assert ours.apply_chat_template(messages, template="mistral-v3") == _reference("v3", messages)
    assert ours.apply_chat_template(messages, template="jinja") == _hf_ids(hf, messages, add_generation_prompt=True)
    assert ours.apply_chat_template(messages, template=INST_STYLE) == _hf_ids(
        hf, messages, chat_template=INST_STYLE, add_generation_prompt=True
    )
    with pytest.raises(ValueError, match="unknown chat template 'chatml'"):
        ours.apply_chat_template(messages, template="chatml")
    plain = loaded_tokenizer("v1")
    with pytest.raises(ValueError, match="no Jinja chat template"):
        plain.apply_chat_template(messages, template="jinja")
    with pytest.raises(ValueError, match="mistral-v3 format needs the \\[INST\\]"):
        plain.apply_chat_template(messages, template="mistral-v3")


def test_named_templates_and_syntax_errors(tmp_path):
    config = tokenizer_config("v1")
    config["chat_template"] = [{"name": "default", "template": CHATML}, {"name": "tool_use", "template": BLOCKY}]
    path = write_sp_dir(tmp_path / "named", "v1", config)
    ours, hf = load_tokenizer(path), hf_tokenizer(str(path))
    messages = [U("hi")]
    assert ours.apply_chat_template(messages) == _hf_ids(hf, messages, add_generation_prompt=True)
    assert ours.apply_chat_template(messages, template="tool_use") == _hf_ids(
        hf, messages, chat_template="tool_use", add_generation_prompt=True
    )
    with pytest.raises(ValueError, match="chat template: syntax error on line 1"):
        ours.apply_chat_template(messages, template="{% for x in %}")
    assert json.loads(ours.render_chat_template([S("é")], template="{{ messages[0]['content'] | tojson }}")) == "é"
