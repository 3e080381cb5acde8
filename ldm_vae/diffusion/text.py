"""Text side of the text-to-image model: captions, a CLIP tokenizer built from them, a CLIP
text encoder trained from scratch, and prompt encoding exactly as StableDiffusionPipeline does it.

The text-to-image model is exported as a stock diffusers `StableDiffusionPipeline`, whose
`tokenizer` is a transformers `CLIPTokenizer` and whose `text_encoder` is a `CLIPTextModel`.
No pretrained CLIP exists offline, so:

- `template_captions` turns class names into a few captions per class; the first template,
  "a photo of a {}", is the evaluation prompt.
- `build_tokenizer` writes a CLIP BPE vocabulary from the captions: CLIP's two special tokens,
  the 256 byte-level symbols (plain and with the `</w>` end-of-word suffix, so any text
  tokenizes without an unknown token) and BPE merges that make every caption word one token
  (up to CLIP's vocabulary size, beyond which rare words take several).
  It saves and loads with `save_pretrained` / `CLIPTokenizer.from_pretrained` (the way
  `StableDiffusionPipeline.from_pretrained` loads it) with identical ids. In transformers 5
  `CLIPTokenizerFast` is the same class, so the fast tokenizer gives the same ids too.
- `build_text_encoder` sizes a randomly initialised `CLIPTextModel` to that tokenizer.
- `tokenize` + `text_encoder(ids)[0]` is `encode_prompts`, which is what
  `StableDiffusionPipeline.encode_prompt` computes: a trainer tokenizes its captions once
  up front and runs only the encoder per batch.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from ..errors import UserError

# the first one is the evaluation prompt; the others vary the wording so the model does not
# tie a class to one exact token sequence. The article stays "a" (no a/an): the evaluation
# prompt must be exactly the template the model trained on.
CAPTION_TEMPLATES = (
    "a photo of a {}",
    "a picture of a {}",
    "an image of a {}",
    "a close-up photo of a {}",
    "a {}",
)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"  # CLIP's; SD's tokenizer pads with EOS too
MAX_TOKENS = 77  # CLIP's context length: longer captions are truncated, as in Stable Diffusion
MAX_VOCAB = 49408  # CLIP's vocabulary size: the most tokens a tokenizer built here has
EOW = "</w>"  # CLIP BPE's end-of-word suffix


# ----------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------

def clean_class_name(name: str) -> str:
    """'T-shirt/top' -> 't-shirt top': lowercase, '/' and '_' to spaces, whitespace collapsed."""
    return " ".join(re.sub(r"[/_]", " ", name).lower().split())


def template_captions(class_names: list[str]) -> list[list[str]]:
    """For each class, its captions: one per template of CAPTION_TEMPLATES, in that order."""
    return [[t.format(clean_class_name(c)) for t in CAPTION_TEMPLATES] for c in class_names]


# ----------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------

def _write_tokenizer(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]],
                     max_length: int) -> CLIPTokenizer:
    """A CLIPTokenizer read from vocab.json and merges.txt written in `folder`."""
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    # the tokenizer skips the "#version" header line, as in OpenAI's merges file
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                         model_max_length=max_length)


def _learn_merges(words: list[tuple[str, ...]]) -> list[tuple[str, str]]:
    """BPE merges (Sennrich et al. 2016, arXiv:1508.07909) learned from the caption words
    (with repeats: frequent words merge first) by the `tokenizers` library's BPE trainer, until
    every word is one token or the vocabulary reaches CLIP's size (MAX_VOCAB).

    BPE encoding applies merges in rank order, so encoding a training word replays the
    training and ends in one token. The trainer marks each word's last symbol with `</w>` as
    CLIP does; the byte-level symbols contain no whitespace, so words split on spaces.
    """
    tokenizer = Tokenizer(models.BPE(end_of_word_suffix=EOW))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(vocab_size=MAX_VOCAB - 2 * 256 - 2, show_progress=False, end_of_word_suffix=EOW)
    lines = (" ".join("".join(w)[:-len(EOW)] for w in words[i:i + 1000]) for i in range(0, len(words), 1000))
    tokenizer.train_from_iterator(lines, trainer)
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]  # "a b" in older versions


def _words(tokenizer: CLIPTokenizer, text: str) -> list[tuple[str, ...]]:
    """`text`'s words as the tokenizer splits them, each as its byte-level symbols.

    With no merges the tokenizer yields one symbol per byte and marks each word's last one
    with `</w>`, so this is CLIP's own normalization and pre-tokenization, whatever the
    transformers version does for them (ftfy or not, slow or Rust tokenizer).
    """
    words, word = [], []
    for symbol in tokenizer.tokenize(text):
        word.append(symbol)
        if symbol.endswith(EOW):
            words.append(tuple(word))
            word = []
    return words


def build_tokenizer(captions: list[str], max_length: int | None = None) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose vocabulary is built from `captions` (see the module doc).

    Ids follow OpenAI's layout: 256 byte symbols, the same with `</w>`, the merge results,
    then <|startoftext|> and <|endoftext|>. `model_max_length` is `max_length` or the longest
    caption's token count + 2 (bos and eos), at most MAX_TOKENS.
    """
    symbols = list(bytes_to_unicode().values())
    base = {s: i for i, s in enumerate(symbols + [s + EOW for s in symbols])}
    with tempfile.TemporaryDirectory() as tmp:
        bytes_only = _write_tokenizer(Path(tmp), {**base, BOS: len(base), EOS: len(base) + 1}, [],
                                      10**6)  # only splits words: no length warning
        words = [w for c in captions for w in _words(bytes_only, c)]
        merges = _learn_merges(words)
        vocab = dict(base)
        for a, b in merges:  # every merge result is a token: any segmentation is in-vocab
            vocab.setdefault(a + b, len(vocab))
        vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1
        if max_length:
            return _write_tokenizer(Path(tmp), vocab, merges, max_length)
        # a caption's token count is its word count unless the vocabulary ran out: count them
        tokenizer = _write_tokenizer(Path(tmp), vocab, merges, 10**6)
        longest = max((len(tokenizer.tokenize(c)) for c in captions), default=0)
        return _write_tokenizer(Path(tmp), vocab, merges, min(longest + 2, MAX_TOKENS))


# ----------------------------------------------------------------------------------------
# Text encoder and prompt encoding
# ----------------------------------------------------------------------------------------

def build_text_encoder(tokenizer: CLIPTokenizer, hidden_size: int = 64, num_layers: int = 2,
                       num_heads: int = 2, intermediate_size: int | None = None) -> CLIPTextModel:
    """A randomly initialised CLIPTextModel sized to `tokenizer` (the caller seeds torch).

    The special token ids come from the tokenizer: the pooled output is read at the first
    eos position, and position embeddings cover `model_max_length` tokens.
    """
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,  # CLIP's MLP ratio
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def text_model(cfg, captions: list[str]) -> tuple[CLIPTokenizer, CLIPTextModel]:
    """(tokenizer, text encoder) of `cfg` (diffusion.config.TextConfig): loaded from
    `cfg.pretrained`'s `tokenizer/` and `text_encoder/`, else built for `captions`."""
    if not cfg.pretrained:
        tokenizer = build_tokenizer(captions)
        return tokenizer, build_text_encoder(tokenizer, cfg.hidden_size, cfg.num_layers, cfg.num_heads)
    try:
        return (CLIPTokenizer.from_pretrained(cfg.pretrained, subfolder="tokenizer"),
                CLIPTextModel.from_pretrained(cfg.pretrained, subfolder="text_encoder"))
    except (OSError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot load text.pretrained={cfg.pretrained}: {reason}. It needs `tokenizer/` and "
                        f"`text_encoder/` subfolders (a Stable Diffusion repo has them); a Hub id needs internet") \
            from None


def _pipeline_inputs(tokenizer: CLIPTokenizer, prompts: list[str]):
    """The tokenizer call of StableDiffusionPipeline.encode_prompt: padded to model_max_length."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt")


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids [B, L] (L = model_max_length) as StableDiffusionPipeline.encode_prompt makes them.

    `text_encoder(tokenize(tokenizer, prompts))[0]` equals `encode_prompts(...)` for an
    encoder without `use_attention_mask` (CLIPTextModel's default), so a trainer tokenizes
    all captions once. The empty prompt "" is the pipeline's unconditional prompt for
    classifier-free guidance (negative_prompt=None gives uncond tokens of ""), so a trainer
    drops captions to "" to learn it.
    """
    return _pipeline_inputs(tokenizer, prompts).input_ids


def encode_prompts(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel,
                   prompts: list[str]) -> torch.Tensor:
    """Hidden states [B, L, hidden], as StableDiffusionPipeline.encode_prompt (clip_skip None)."""
    inputs = _pipeline_inputs(tokenizer, prompts)
    mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):  # the pipeline's own check
        mask = inputs.attention_mask.to(text_encoder.device)
    return text_encoder(inputs.input_ids.to(text_encoder.device), attention_mask=mask)[0]


# ----------------------------------------------------------------------------------------
# What a run trains on
# ----------------------------------------------------------------------------------------

def class_prompt(name: str) -> str:
    """The prompt for a class: the first template ("a photo of a {}"), which it trained on."""
    return CAPTION_TEMPLATES[0].format(clean_class_name(name))


@dataclass
class TrainingCaptions:
    """The captions a text-conditional model trains on, and how a batch picks its own: a cache
    row's caption index `i` is `texts[i]`; from class names (`per_class` templates each),
    image of label `c` gets `texts[c * per_class + k]` for a template `k` drawn per image."""

    texts: list[str]
    per_class: int = 0  # 0: the cache's own captions
    class_names: list[str] | None = None  # set where the captions are templates over them


def training_captions(cache_dir, meta: dict) -> TrainingCaptions:
    """The cache's captions (data.caption_column) or else templates over its class names."""
    from .latents import read_captions

    if meta.get("has_captions"):
        return TrainingCaptions(read_captions(cache_dir, meta))
    if meta.get("has_labels"):
        names = meta.get("class_names") or [str(i) for i in range(meta["num_classes"])]
        return TrainingCaptions([c for per in template_captions(names) for c in per], len(CAPTION_TEMPLATES), names)
    raise UserError(f"diffusion.conditioning is text but the latent cache {cache_dir} has neither captions nor "
                    f"labels ({meta['dataset']}): encode with data.caption_column set to the captions' column, or "
                    f"use diffusion.conditioning=none")
