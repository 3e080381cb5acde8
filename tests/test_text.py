"""The text side: captions, a CLIP tokenizer built from them, and prompt encoding that
matches a stock StableDiffusionPipeline's `encode_prompt`."""

from __future__ import annotations

import pytest
import regex
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTokenizer, CLIPTokenizerFast

from ldm_vae.diffusion.text import (
    CAPTION_TEMPLATES,
    build_text_encoder,
    build_tokenizer,
    encode_prompts,
    template_captions,
    tokenize,
)

FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# OpenAI CLIP's pre-tokenization pattern, written out here so the test does not reuse the
# code under test to count words
CLIP_WORDS = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
HIDDEN = 16


@pytest.fixture(scope="module")
def captions() -> list[str]:
    return [c for per_class in template_captions(FASHION) for c in per_class]


@pytest.fixture(scope="module")
def tokenizer(captions) -> CLIPTokenizer:
    return build_tokenizer(captions)


@pytest.fixture(scope="module")
def text_encoder(tokenizer):
    torch.manual_seed(0)
    return build_text_encoder(tokenizer, hidden_size=HIDDEN, num_layers=1, num_heads=2).eval()


def _in_vocab_ids(tok: CLIPTokenizer, text: str) -> list[int]:
    """`text`'s ids without bos/eos, after checking every token string is in the vocabulary."""
    tokens = tok.tokenize(text)
    vocab = tok.get_vocab()
    assert all(t in vocab for t in tokens), tokens
    return tok.convert_tokens_to_ids(tokens)


def test_template_captions_clean_class_names():
    caps = template_captions(["Ankle boot", "T-shirt/top", "my_CLASS  name"])
    assert CAPTION_TEMPLATES[0] == "a photo of a {}"
    assert [len(c) for c in caps] == [len(CAPTION_TEMPLATES)] * 3
    assert caps[0][0] == "a photo of a ankle boot"
    assert caps[1][0] == "a photo of a t-shirt top"
    assert caps[2][-1] == CAPTION_TEMPLATES[-1].format("my class name")


def test_every_caption_word_is_one_token(tokenizer, captions):
    for c in captions:
        words = CLIP_WORDS.findall(c.lower())
        ids = tokenizer(c).input_ids
        assert len(ids) == len(words) + 2, (c, tokenizer.tokenize(c))
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        # unk is <|endoftext|> in CLIP: it must not appear between bos and eos
        assert tokenizer.unk_token_id not in _in_vocab_ids(tokenizer, c)
        assert all(t.endswith("</w>") for t in tokenizer.tokenize(c))  # whole words only
    longest = max(len(tokenizer(c).input_ids) for c in captions)
    assert tokenizer.model_max_length == longest
    assert build_tokenizer(captions, max_length=20).model_max_length == 20


def test_unseen_text_falls_back_to_in_vocab_pieces(tokenizer):
    for text in ["a photo of a zebra", "Zürich ☃!", "sneakers", "42"]:
        ids = _in_vocab_ids(tokenizer, text)
        assert tokenizer.unk_token_id not in ids
        # byte-level: nothing is lost (CLIP makes each digit a word, so "42" decodes as "4 2")
        assert tokenizer.decode(ids).replace(" ", "") == text.lower().replace(" ", "")
    assert len(tokenizer.tokenize("zebra")) > 1


def test_tokenizer_round_trips_through_save_pretrained(tokenizer, captions, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    prompts = captions + ["", "a photo of a zebra", "Zürich 42 ☃!"]
    for cls in (CLIPTokenizer, CLIPTokenizerFast):
        loaded = cls.from_pretrained(tmp_path)
        assert loaded.model_max_length == tokenizer.model_max_length
        assert torch.equal(tokenize(loaded, prompts), tokenize(tokenizer, prompts))


def test_text_encoder_is_sized_to_the_tokenizer(tokenizer, text_encoder):
    cfg = text_encoder.config
    assert cfg.vocab_size == len(tokenizer) == text_encoder.get_input_embeddings().num_embeddings
    assert cfg.max_position_embeddings == tokenizer.model_max_length
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    # the pooled output is the state at the first eos
    ids = tokenize(tokenizer, ["a photo of a bag"])
    out = text_encoder(ids)
    eos = (ids[0] == tokenizer.eos_token_id).nonzero()[0, 0]
    torch.testing.assert_close(out.pooler_output[0], out.last_hidden_state[0, eos])


def test_encode_prompts_matches_stock_pipeline(tokenizer, text_encoder):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(4, 8),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=HIDDEN, attention_head_dim=2, norm_num_groups=2)
    vae = AutoencoderKL(block_out_channels=(4,), latent_channels=4, norm_num_groups=2,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    prompts = ["a photo of a ankle boot", "a photo of a zebra"]
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompts, torch.device("cpu"), 1,
                                          do_classifier_free_guidance=True, negative_prompt=None)
        ours = encode_prompts(tokenizer, text_encoder, prompts + ["", ""])
        per_batch = text_encoder(tokenize(tokenizer, prompts))[0]  # what a trainer does
    assert ours.shape == (4, tokenizer.model_max_length, HIDDEN)
    torch.testing.assert_close(ours[:2], cond, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[2:], uncond, rtol=0, atol=1e-6)
    torch.testing.assert_close(per_batch, cond, rtol=0, atol=1e-6)
