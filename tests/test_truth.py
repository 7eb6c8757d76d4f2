"""End to end: a tiny Mixtral trained here in MLX to memorize a text, saved in Hugging Face format
(proved by transformers loading it and agreeing), converted to 4-bit by our converter, loaded and
run by our generate: the memorized continuation must come back, token for token."""

import json

import mlx.core as mx
import numpy as np
import torch
from helpers.memorized import (
    TEXT_CONTINUATION,
    TEXT_PROMPT,
    TRANSCRIPT,
    memorized_4bit,
    memorized_hf,
    training_sequences,
    training_steps,
)
from helpers.tiny_models import load_hf_model

from mlx_mixtral import generate, load, load_model, stream_generate
from mlx_mixtral.tokenizer import load_tokenizer


def _continuation_ids(tok):
    prompt = tok.encode(TEXT_PROMPT, add_special_tokens=True)
    full = tok.encode(TEXT_PROMPT + TEXT_CONTINUATION, add_special_tokens=True)
    assert full[: len(prompt)] == prompt  # the prompt ends at a word boundary
    return prompt, full[len(prompt) :]


def test_training_converged_quickly(tmp_path_factory):
    memorized_hf(tmp_path_factory)
    assert training_steps(tmp_path_factory) < 200


def test_transformers_reads_the_saved_checkpoint_and_recites(tmp_path_factory):
    path = memorized_hf(tmp_path_factory)
    tok = load_tokenizer(path)
    hf = load_hf_model(path)
    # Same logits as our float model on the same files: names, expert split and layout are right.
    ids = training_sequences(tok)[1]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits.double().numpy()
    ours = np.array(load_model(path)(mx.array([ids])), dtype=np.float64)
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 2e-5
    prompt, continuation = _continuation_ids(tok)
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=len(continuation), pad_token_id=0)[
            0, len(prompt) :
        ].tolist()
    assert out == continuation


def test_4bit_conversion_recites_the_continuation(tmp_path_factory):
    path = memorized_4bit(tmp_path_factory)
    config = json.loads((path / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 64
    model, tok = load(path)
    assert type(model.layers[0].block_sparse_moe.switch_mlp.gate_proj).__name__ == "QuantizedSwitchLinear"
    prompt, continuation = _continuation_ids(tok)
    tokens = [r.token for r in stream_generate(model, tok, TEXT_PROMPT, max_tokens=len(continuation))]
    assert tokens == continuation
    assert generate(model, tok, TEXT_PROMPT, max_tokens=len(continuation)) == TEXT_CONTINUATION


def test_4bit_model_answers_the_memorized_chat(tmp_path_factory):
    model, tok = load(memorized_4bit(tmp_path_factory))
    ids = tok.apply_chat_template(TRANSCRIPT[:1])
    answer = [r for r in stream_generate(model, tok, ids, max_tokens=40)]
    assert "".join(r.text for r in answer) == TRANSCRIPT[1]["content"]
    assert answer[-1].token == tok.eos_token_id and answer[-1].finish_reason == "stop"
