"""Text encoders (diffusion/models/text.py): the char-level transformer's tokenizer and its
invariance to padding, and a frozen Hugging Face encoder loaded from a tiny CLIP / T5 saved on the
spot (no download), checked against the in-memory model, with its embedding cache."""

from __future__ import annotations

import copy

import pytest
import torch

from diffusion.models.text import (
    BOS, CHARACTER_IDS, PAD, PRETRAINED_PAD, UNK, CharTransformerEncoder, PretrainedTextEncoder, TextEncoderError,
    build_text_encoder, load_text_embedding_cache, save_text_embedding_cache, text_embedding_cache,
)

CAPTIONS = ["a thick, right-leaning seven", "a thin one", "", "a thick seven", "a thin one"]
WORDS = ["a", "thick", "thin", "right", "-", "leaning", "seven", "one", ","]


# ---------------------------------------------------------------- the char-level transformer


def test_char_tokenize_pads_truncates_and_maps_unknown_characters():
    encoder = CharTransformerEncoder(width=16, depth=1, heads=2, max_length=10)
    tokens = encoder.tokenize(["Seven", "", "a\tb\u00e9", "x" * 25])
    assert tokens.dtype == torch.int64 and tokens.shape == (4, 10)
    assert tokens[0].tolist() == [BOS] + [CHARACTER_IDS[c] for c in "seven"] + [PAD] * 4  # lower-cased, padded
    assert tokens[1].tolist() == [BOS] + [PAD] * 9 and torch.equal(encoder.null_tokens, tokens[1])
    assert tokens[2, :5].tolist() == [BOS, CHARACTER_IDS["a"], UNK, CHARACTER_IDS["b"], UNK]
    assert tokens[3].tolist() == [BOS] + [CHARACTER_IDS["x"]] * 9  # truncated to max_length - 1 characters
    assert torch.equal(encoder.tokenize(["Seven"]), tokens[:1])
    assert len(set(CHARACTER_IDS.values()) | {PAD, BOS, UNK}) == len(CHARACTER_IDS) + 3
    with pytest.raises(TypeError, match="list of strings"):
        encoder.tokenize("seven")


def test_char_encoder_ignores_padding_and_its_spec_rebuilds_it():
    torch.manual_seed(0)
    encoder = build_text_encoder("char-transformer", width=32, depth=2, heads=4, max_length=48).double()
    tokens = encoder.tokenize(CAPTIONS)
    full = encoder(tokens)
    assert full.tokens.shape == (5, 48, 32) and full.pooled.shape == (5, 32)
    assert torch.equal(full.mask, tokens != PAD) and full.mask.sum(1).tolist() == [1 + len(c) for c in CAPTIONS]
    assert not full.tokens[~full.mask].any()  # padded positions are zero
    # The same captions at a shorter padding (a prefix of the rows): the same real tokens and pooled vectors.
    short = encoder(tokens[:, :30])
    assert torch.allclose(short.pooled, full.pooled, rtol=0, atol=1e-12)
    assert torch.allclose(short.tokens, full.tokens[:, :30], rtol=0, atol=1e-12)
    # pooled is the mean of the real tokens; the empty caption has one, BOS.
    assert torch.allclose(full.pooled[2], full.tokens[2, 0], rtol=0, atol=1e-12)
    assert torch.allclose(full.pooled[0], full.tokens[0, : 1 + len(CAPTIONS[0])].mean(0), rtol=0, atol=1e-12)
    rebuilt = build_text_encoder(**encoder.spec()).double()
    rebuilt.load_state_dict(encoder.state_dict())
    assert torch.equal(rebuilt(tokens).pooled, full.pooled)


def test_char_encoder_gradients_reach_every_parameter():
    torch.manual_seed(0)
    encoder = CharTransformerEncoder(width=16, depth=2, heads=2, max_length=12)
    out = encoder(encoder.tokenize(["a thick, right-leaning seven", ""]))  # the first fills every position
    (out.pooled.square().sum() + out.tokens.square().sum()).backward()
    for name, parameter in encoder.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"depth": 0}, r"text.overrides.depth: needs an int >= 1 \(got 0\)"),
        ({"layers": 2}, "unknown key 'layers' for char-transformer; allowed: width, depth, heads, max_length, mlp_ratio"),
        ({"width": 30, "heads": 4}, "num_heads=4 does not divide the width 30"),
    ],
)
def test_char_encoder_bad_overrides_are_one_line(overrides, message):
    with pytest.raises(TextEncoderError, match=message) as err:
        build_text_encoder("char-transformer", **overrides)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- a frozen Hugging Face encoder


def _save_tiny(folder, kind):
    """A BERT-style WordPiece tokenizer over WORDS ([CLS] caption [SEP]) and a random tiny CLIP or T5 text encoder."""
    transformers = pytest.importorskip("transformers")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = transformers.BertTokenizer(vocab={word: i for i, word in enumerate(vocab)}, model_max_length=16)
    torch.manual_seed(0)
    if kind == "clip":
        config = transformers.CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=16, pad_token_id=0, bos_token_id=2, eos_token_id=3,
        )
        model = transformers.CLIPTextModel(config)
    else:
        config = transformers.T5Config(
            vocab_size=len(vocab), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, pad_token_id=0, eos_token_id=3,
        )
        model = transformers.T5EncoderModel(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer, model.eval()


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text") / "clip"
    tokenizer, model = _save_tiny(folder, "clip")
    return folder, tokenizer, model, build_text_encoder(str(folder))


def test_pretrained_matches_the_in_memory_model(tiny_clip):
    folder, tokenizer, model, encoder = tiny_clip
    assert isinstance(encoder, PretrainedTextEncoder) and type(encoder.model).__name__ == "CLIPTextModel"
    assert (encoder.dim, encoder.max_length) == (32, 16)
    assert encoder.spec() == {"name": str(folder), "max_length": 16}
    batch = tokenizer(CAPTIONS, padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch)
    tokens = encoder.tokenize(CAPTIONS)
    assert torch.equal(tokens != PRETRAINED_PAD, batch["attention_mask"].bool())
    assert torch.equal(tokens[tokens != PRETRAINED_PAD], batch["input_ids"][batch["attention_mask"].bool()])
    assert tokens[2, :2].tolist() == [2, 3] and torch.equal(encoder.null_tokens, tokens[2])  # "" is [CLS] [SEP]
    out = encoder(tokens)
    mask = out.mask[..., None]
    assert torch.equal(out.mask, batch["attention_mask"].bool())
    assert torch.allclose(out.tokens, expected.last_hidden_state * mask, rtol=0, atol=1e-6)
    assert torch.allclose(out.pooled, expected.pooler_output, rtol=0, atol=1e-6)
    long = encoder.tokenize([" ".join(["seven"] * 30)])[0]
    assert (long != PRETRAINED_PAD).all() and long[0] == 2 and long[-1] == 3  # truncated to 16, [SEP] kept
    assert build_text_encoder(str(folder), max_length=8).tokenize(["a thin one"]).shape == (1, 8)


def test_pretrained_is_frozen(tiny_clip):
    encoder = tiny_clip[3]
    parent = torch.nn.Sequential(encoder, torch.nn.Linear(2, 2))
    parent.train()
    assert encoder.training and not encoder.model.training
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not encoder(encoder.tokenize(CAPTIONS)).tokens.requires_grad


def test_t5_pools_the_mean_of_its_real_tokens(tmp_path):
    tokenizer, model = _save_tiny(tmp_path / "t5", "t5")
    encoder = build_text_encoder(str(tmp_path / "t5"), max_length=12)
    assert type(encoder.model).__name__ == "T5EncoderModel" and encoder.max_length == 12
    batch = tokenizer(CAPTIONS, padding="max_length", max_length=12, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    weights = batch["attention_mask"][..., None].float()
    out = encoder(encoder.tokenize(CAPTIONS))
    assert torch.allclose(out.pooled, (hidden * weights).sum(1) / weights.sum(1), rtol=0, atol=1e-6)


def test_cache_is_looked_up_and_the_model_runs_on_misses_alone(tiny_clip, tmp_path):
    encoder = tiny_clip[3]
    calls = []
    hook = encoder.model.register_forward_pre_hook(
        lambda _, args, kwargs: calls.append(len(kwargs["input_ids"])), with_kwargs=True
    )
    try:
        cache = text_embedding_cache(encoder, CAPTIONS[:3], batch_size=2)
        assert calls == [2, 1] and len(cache["ids"]) == 3  # three distinct rows, the empty caption among them
        save_text_embedding_cache(tmp_path / "text.npz", cache)
        loaded = load_text_embedding_cache(tmp_path / "text.npz")
        assert all(torch.equal(loaded[key], cache[key]) for key in cache)
        tokens = encoder.tokenize(CAPTIONS)  # rows 0-2 are in the cache; row 3 is not; row 4 repeats row 1
        plain = encoder(tokens)
        encoder.use_cache(loaded)
        calls.clear()
        hits = encoder(tokens[[0, 1, 2, 4]])
        assert calls == []
        row = {bytes(r.numpy().tobytes()): i for i, r in enumerate(loaded["ids"])}
        index = [row[tokens[i].numpy().tobytes()] for i in (0, 1, 2, 4)]
        assert torch.equal(hits.tokens, loaded["tokens"][index]) and torch.equal(hits.pooled, loaded["pooled"][index])
        mixed = encoder(tokens)
        assert calls == [1]  # the one miss
        ema = copy.deepcopy(encoder)  # as the EMA networks are made: the copy looks up the same cache, not a copy of it
        assert ema._lookup is encoder._lookup and torch.equal(ema(tokens[:3]).tokens, mixed.tokens[:3]) and calls == [1]
        miss = encoder.encode(tokens[3:4])
        assert torch.equal(mixed.tokens[3:4], miss.tokens) and torch.equal(mixed.pooled[3:4], miss.pooled)
        assert torch.equal(mixed.tokens[[0, 1, 2, 4]], hits.tokens) and torch.equal(mixed.mask, plain.mask)
        assert torch.allclose(mixed.tokens, plain.tokens, rtol=0, atol=1e-6)
        assert torch.allclose(mixed.pooled, plain.pooled, rtol=0, atol=1e-6)
    finally:
        hook.remove()
        encoder.use_cache(None)


def test_bad_folders_and_caches_are_one_line(tiny_clip, tmp_path):
    with pytest.raises(TextEncoderError, match=f"text.encoder: {tmp_path / 'none'} is not a folder with a config.json"):
        build_text_encoder(str(tmp_path / "none"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(TextEncoderError, match=f"text.encoder: {tmp_path / 'broken'} cannot be loaded") as err:
        build_text_encoder(str(tmp_path / "broken"))
    assert "\n" not in str(err.value)
    with pytest.raises(TextEncoderError, match="unknown key 'width'"):
        build_text_encoder(str(tiny_clip[0]), width=8)
    with pytest.raises(TextEncoderError, match=f"{tmp_path / 'none.npz'}: not a text embedding cache"):
        load_text_embedding_cache(tmp_path / "none.npz")
    (tmp_path / "other.npz").write_bytes(b"not a zip")
    with pytest.raises(TextEncoderError, match="other.npz: not a text embedding cache"):
        load_text_embedding_cache(tmp_path / "other.npz")
    cache = text_embedding_cache(tiny_clip[3], ["a thin one"], batch_size=4)
    save_text_embedding_cache(tmp_path / "cut.npz", cache | {"pooled": cache["pooled"][:1]})  # 2 rows, 1 pooled
    with pytest.raises(TextEncoderError, match=r"cut.npz: not a text embedding cache \(its arrays disagree in shape\)"):
        load_text_embedding_cache(tmp_path / "cut.npz")
    short = build_text_encoder(str(tiny_clip[0]), max_length=8)
    with pytest.raises(TextEncoderError, match="text embedding cache: 16 tokens of width 32.*gives 8 of width 32"):
        short.use_cache(cache)
