"""Offline CLIP tokenizers whose vocabulary makes chosen words single tokens.

`write_clip_tokenizer` writes the files of a real byte-level BPE `CLIPTokenizer` (vocab.json, merges.txt and
the config files of an SD checkpoint's `tokenizer/` folder) from a word list, with no download: the demo model
(`workbench.demo.train`) is trained with one over the shapes captions, and the tiny test pipelines
(`workbench.models.tiny`) use one over `DEFAULT_WORDS`.

Example:

    >>> from transformers import CLIPTokenizer
    >>> tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp, ["red", "circle"]))
    >>> tok.convert_ids_to_tokens(tok("a red circle").input_ids)
    ['<|startoftext|>', 'a</w>', 'red</w>', 'circle</w>', '<|endoftext|>']
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import CLIPTokenizer


BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77  # CLIP's context length; the text encoders' position table has this many rows

# Words that each become a single token: the shapes-and-colours captions of the demo model and the words of
# typical prompts. Any other text still tokenizes (into single characters), as with CLIP's real vocabulary.
DEFAULT_WORDS: tuple[str, ...] = (
    # colours
    "red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white", "gray", "grey",
    "cyan", "magenta", "violet", "gold", "silver", "dark", "light", "bright", "colorful",
    # shapes
    "circle", "circles", "square", "squares", "triangle", "triangles", "rectangle", "star", "stars", "ring",
    "disk", "dot", "dots", "line", "lines", "stripe", "stripes", "cross", "heart", "diamond", "hexagon",
    "shape", "shapes", "oval", "ellipse",
    # positions
    "left", "right", "top", "bottom", "center", "middle", "above", "below", "under", "over", "next", "near",
    "behind", "front", "corner", "upper", "lower", "inside", "outside", "between", "beside",
    # sizes and counts
    "small", "large", "big", "tiny", "huge", "medium", "little", "tall", "short", "wide", "narrow",
    "one", "two", "three", "four", "five", "many", "several", "single", "pair",
    # typical prompt words
    "a", "an", "the", "of", "on", "in", "at", "with", "and", "to", "is", "by", "for", "from", "its", "their",
    "photo", "picture", "image", "painting", "drawing", "sketch", "render", "portrait", "landscape", "style",
    "cat", "dog", "bird", "horse", "man", "woman", "person", "people", "child", "car", "bus", "train", "boat",
    "house", "tree", "trees", "flower", "flowers", "city", "street", "room", "table", "chair", "kitchen",
    "beach", "mountain", "mountains", "sky", "sea", "ocean", "river", "lake", "forest", "field", "snow",
    "sun", "moon", "night", "day", "sunset", "water", "grass", "road", "window", "wall", "floor", "background",
    "sitting", "standing", "walking", "running", "holding", "riding", "flying", "playing", "eating", "looking",
    "plate", "food", "pizza", "cake", "bowl", "cup", "bed", "sofa", "laptop", "phone", "clock", "sign",
    "astronaut", "robot", "castle", "garden", "vase", "fruit", "apple", "banana",
    "high", "quality", "detailed", "realistic", "beautiful", "old", "new", "young", "simple", "plain",
    "empty", "blank", "digital", "art", "oil", "canvas", "cinematic", "lighting", "sharp", "focus", "blurry",
)  # fmt: skip

_LETTERS_ONLY = re.compile(r"^[^\W\d_]+$")  # what CLIP's pre-tokenizer keeps as one piece: \p{L}+


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters.

    Printable latin-1 bytes map to themselves; the others, in byte order, to code points 256 and up.

    Returns:
        dict[int, str]: byte value -> one character.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in keep]
    # insertion order is CLIP's vocabulary order: the printable bytes first, then the remapped ones
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges to one word: repeatedly merge the adjacent pair of lowest rank, left to right.

    Args:
        symbols (list[str]): the word's byte-level characters, the last one carrying the "</w>" suffix.
        ranks (dict[tuple[str, str], int]): merge pair -> priority (lower merges first).

    Returns:
        list[str]: the word's tokens once no adjacent pair has a merge.
    """
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = set(zip(symbols, symbols[1:]))
        best = min(pairs, key=lambda pair: ranks.get(pair, len(ranks)))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def clip_bpe_vocab(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Build a CLIP-layout BPE vocabulary and merge list in which each word is exactly one token.

    The layout is CLIP's: the 256 byte characters, the same with "</w>" (end of word), the merge results in
    merge order, then `<|startoftext|>` and `<|endoftext|>`. Merges are added word by word: a word is run through
    the merges so far, and while it is still more than one token its first two tokens are merged. A new merge
    has the lowest priority, so it applies only where no earlier merge does and never changes a word that was
    already one token.

    Args:
        words (Iterable[str]): lowercase words of letters only (CLIP lowercases and splits off digits and
            punctuation, so nothing else can be a single token). Duplicates are ignored.

    Returns:
        tuple[dict[str, int], list[tuple[str, str]]]: (token -> id, merges in priority order).
    """
    words = list(dict.fromkeys(words))
    bad = [w for w in words if not isinstance(w, str) or not _LETTERS_ONLY.match(w) or w != w.lower()]
    if bad:
        raise ValueError(f"words must be non-empty lowercase letters only (CLIP splits off the rest); got {bad[:10]}")
    byte_chars = list(_bytes_to_unicode().values())
    tokens = [*byte_chars, *(c + "</w>" for c in byte_chars)]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        chars = [_bytes_to_unicode()[b] for b in word.encode("utf-8")]
        parts = _bpe([*chars[:-1], chars[-1] + "</w>"], ranks)
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            tokens.append(pair[0] + pair[1])
            parts = [pair[0] + pair[1], *parts[2:]]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def write_clip_tokenizer(
    directory: str | os.PathLike,
    words: Iterable[str] = DEFAULT_WORDS,
    *,
    pad_token: str = EOS_TOKEN,
    model_max_length: int = MODEL_MAX_LENGTH,
) -> Path:
    """Write the files of a CLIP BPE tokenizer in which every word of `words` is one token.

    Writes vocab.json, merges.txt, special_tokens_map.json and tokenizer_config.json, the files of the
    `tokenizer/` folder of an SD checkpoint, so `transformers.CLIPTokenizer.from_pretrained(directory)` loads
    offline. Words not listed still tokenize, into byte-level characters, as unseen words do with CLIP.

    Args:
        directory (str | os.PathLike): folder to write into; created if missing.
        words (Iterable[str], defaults to `DEFAULT_WORDS`): lowercase words of letters only.
        pad_token (str, defaults to "<|endoftext|>"): SD 1.x pads with "<|endoftext|>", SDXL's second
            tokenizer with "!".
        model_max_length (int, defaults to 77): the length prompts are padded and truncated to.

    Returns:
        Path: `directory`.

    Example:

        >>> tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp, ["red", "circle"]))
        >>> tok("a red circle").input_ids  # bos, a</w>, red</w>, circle</w>, eos
    """
    vocab, merges = clip_bpe_vocab(words)
    if pad_token not in vocab:
        raise ValueError(f"pad_token {pad_token!r} is not in the vocabulary; use {EOS_TOKEN!r} or a single character")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    specials = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad_token}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "do_lower_case": True,
        "errors": "replace",
        **specials,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return directory


def clip_tokenizer(words: Iterable[str] = DEFAULT_WORDS, *, pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
    """Load a `CLIPTokenizer` from files written by `write_clip_tokenizer` to a temporary folder.

    Args:
        words (Iterable[str], defaults to `DEFAULT_WORDS`): words that become single tokens.
        pad_token (str, defaults to "<|endoftext|>"): the padding token.

    Returns:
        CLIPTokenizer: held in memory; the temporary files are gone.
    """
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="workbench-tokenizer-") as tmp:
        return CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp, words, pad_token=pad_token))
