"""An offline, Gemma-style BPE tokenizer for tiny test checkpoints.

The tokenizer is trained here, deterministically, on a small embedded corpus (shapes, colors,
positions, counts, backgrounds and common words), so tests never download one. It follows the
Gemma pipeline that transformers' ``GemmaTokenizer`` rebuilds from ``tokenizer.json``: spaces are
normalized to "▁", no prefix space, BPE with byte fallback over the 256 ``<0xNN>`` tokens, digits
kept as single characters, and runs of newlines as single tokens.
"""

import functools
import heapq
import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

SPECIAL_TOKENS = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
)


@dataclass(frozen=True)
class TinyTokenIds:
    """Ids of the special tokens; fixed, whatever the corpus."""

    pad: int = 0
    eos: int = 1
    bos: int = 2
    unk: int = 3
    mask: int = 4
    start_of_turn: int = 5
    end_of_turn: int = 6
    boi: int = 7
    eoi: int = 8
    image: int = 9


TOKEN_IDS = TinyTokenIds()

# Merges are learned until the tokenizer holds this many tokens (or the corpus runs out of pairs).
# Deliberately not a multiple of 64, so that the model's padded vocab has rows without a token.
TARGET_VOCAB_SIZE = 1100
NEWLINE_RUN_LENGTHS = range(2, 9)
_SPACE = "▁"
_BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))
# Training units: "▁" sticks to the word it precedes; digits stay single; newline runs stay whole.
_UNIT_PATTERN = re.compile(r"\n+|▁?[A-Za-z']+|▁?[0-9]|▁?[^A-Za-z0-9▁\n]+|▁+")

CORPUS = """\
A red circle is in the top left corner of the image.
There is a small blue square at the bottom right, and a large green triangle in the center.
The background is white. The background is black. The background is gray with a light gradient.
Two yellow stars are next to each other on the left side of the picture.
Three purple hexagons are stacked vertically along the right edge.
One orange rectangle lies below a pink ellipse near the middle.
Four cyan diamonds form a row across the upper half; five brown pentagons line the lower half.
What shapes do you see? How many circles are there? Which color is the biggest shape?
Describe the image. Describe this picture in one sentence. Answer with a number.
The image shows a dark blue background with 3 small white dots and 1 big red heart.
I see 2 circles, 4 squares and 6 triangles; 7, 8, 9 and 0 are digits too.
Above, below, behind, beside, between, inside, outside, around, over, under, near, far.
Left, right, top, bottom, center, middle, corner, edge, side, upper, lower, front, back.
Colors: red, green, blue, yellow, orange, purple, pink, brown, black, white, gray, grey, cyan,
magenta, violet, teal, navy, olive, maroon, gold, silver, beige, turquoise, lavender.
Shapes: circle, square, triangle, rectangle, star, heart, ellipse, oval, diamond, hexagon,
pentagon, octagon, cross, arrow, line, dot, ring, crescent, spiral, cube, sphere, cone.
Sizes: tiny, small, medium, large, big, huge, thin, thick, wide, narrow, tall, short, long.
Counts: zero, one, two, three, four, five, six, seven, eight, nine, ten, many, several, few,
single, pair, couple, dozen, none, all, each, every, both, either, neither, only, more, less.
The scene is simple: a plain background, flat colors, sharp edges, no text and no people.
A striped background, a checkered background, a dotted pattern, a solid fill, a soft shadow.
The shapes overlap slightly. The circle touches the square. The star is rotated a little.
Sure! Here is a short caption: "a blue circle above a red square on a yellow background".
Please look carefully at the picture and tell me what you notice first.
It is a good question, and the answer depends on what you want to know about the shapes.
The user asked the model for help, so the model gave a clear, helpful and honest reply.
We can count them together: first, second, third, fourth, fifth, last.
Yes, no, maybe, perhaps, because, however, although, while, when, where, why, what, who.
This, that, these, those, here, there, then, than, with, without, from, into, onto, about.
He, she, it, we, they, you, me, him, her, us, them, my, your, his, its, our, their.
Is, are, was, were, be, been, being, has, have, had, do, does, did, can, could, will, would.
Should, may, might, must, shall, make, made, take, took, give, gave, get, got, show, shown.
Look, looks, looking, see, seen, saw, find, found, draw, drawn, paint, painted, fill, filled.
Image, images, picture, pictures, photo, photos, drawing, scene, frame, crop, crops, pixel.
Hello, world! Thank you. Good morning. Good night. The quick brown fox jumps over the lazy dog.
Numbers: 10, 25, 100, 256, 1024, 3.14, 2025-01-31, 50% of the area, (x, y) = (12, 34).
Symbols: + - * / = < > # @ & $ ~ ^ _ | \\ [ ] { } ` ' " : ; ! ? . ,
In summary, the picture contains several colorful geometric shapes on a plain background.
"""


def build_tokenizer() -> Tokenizer:
    """A fresh Gemma-style tokenizer; identical (vocab, merges, ids) on every call."""
    vocab, merges = _trained_vocab_and_merges()
    model = BPE(
        vocab={token: i for i, token in enumerate(vocab)},
        merges=list(merges),
        unk_token="<unk>",
        fuse_unk=True,
        byte_fallback=True,
    )
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Replace(" ", _SPACE)
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos>:1 $B:1", special_tokens=[("<bos>", TOKEN_IDS.bos)]
    )
    tokenizer.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS]
    )
    return tokenizer


@functools.cache
def _trained_vocab_and_merges() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    # Cached because it is pure and immutable; each build_tokenizer() still returns a new object.
    unit_counts = Counter(_UNIT_PATTERN.findall(CORPUS.replace(" ", _SPACE)))
    for length in NEWLINE_RUN_LENGTHS:
        unit_counts["\n" * length] += 10
    printable = {chr(c) for c in range(33, 127)}
    alphabet = sorted(printable | {_SPACE, "\n", "\t"} | set("".join(unit_counts)))
    vocab = list(SPECIAL_TOKENS) + list(_BYTE_TOKENS) + alphabet
    merges = _learn_merges(unit_counts, TARGET_VOCAB_SIZE - len(vocab))
    known = set(vocab)
    for left, right in merges:
        if left + right not in known:
            known.add(left + right)
            vocab.append(left + right)
    return tuple(vocab), tuple(merges)


def _learn_merges(unit_counts: Counter[str], max_new_tokens: int) -> list[tuple[str, str]]:
    """Classic BPE training: repeatedly merge the most frequent adjacent pair (ties: smallest pair)."""
    words = [list(unit) for unit in sorted(unit_counts)]
    weights = [unit_counts[unit] for unit in sorted(unit_counts)]
    pair_counts: Counter[tuple[str, str]] = Counter()
    words_with: defaultdict[tuple[str, str], set[int]] = defaultdict(set)
    for i, word in enumerate(words):
        for pair in zip(word, word[1:], strict=False):
            pair_counts[pair] += weights[i]
            words_with[pair].add(i)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    created: set[str] = set()
    while heap and len(created) < max_new_tokens:
        negative_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -negative_count or negative_count == 0:
            continue  # stale heap entry
        merges.append(pair)
        created.add(pair[0] + pair[1])
        changed = set()
        for i in sorted(words_with.pop(pair)):
            old, new = words[i], _merge_pair(words[i], pair)
            for p in zip(old, old[1:], strict=False):
                pair_counts[p] -= weights[i]
                changed.add(p)
            for p in zip(new, new[1:], strict=False):
                pair_counts[p] += weights[i]
                words_with[p].add(i)
                changed.add(p)
            words[i] = new
        for p in sorted(changed):
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
            else:
                del pair_counts[p]
    return merges


def _merge_pair(word: list[str], pair: tuple[str, str]) -> list[str]:
    merged, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            merged.append(word[i] + word[i + 1])
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return merged


# Gemma3 instruct format. A system message is folded into the first user turn; "assistant" is
# rendered as "model"; an image item becomes <start_of_image>, which the processor expands.
CHAT_TEMPLATE = """\
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- if messages[0]['content'] is string -%}
    {%- set system_text = messages[0]['content'] | trim -%}
  {%- else -%}
    {%- set system_text = messages[0]['content'] | selectattr('type', 'equalto', 'text') \
| map(attribute='text') | join('') | trim -%}
  {%- endif -%}
  {%- set turns = messages[1:] -%}
{%- else -%}
  {%- set system_text = '' -%}
  {%- set turns = messages -%}
{%- endif -%}
{{ bos_token }}
{%- for message in turns -%}
  {%- set expected_role = 'user' if loop.index0 % 2 == 0 else 'assistant' -%}
  {%- if message['role'] != expected_role -%}
    {{ raise_exception('Roles must alternate user/assistant/user/... after an optional system \
message; message ' ~ loop.index0 ~ ' has role ' ~ message['role']) }}
  {%- endif -%}
  {{ '<start_of_turn>' ~ ('model' if message['role'] == 'assistant' else 'user') ~ '\n' }}
  {%- if loop.first and system_text -%}
    {{ system_text ~ '\n\n' }}
  {%- endif -%}
  {%- if message['content'] is string -%}
    {{ message['content'] | trim }}
  {%- else -%}
    {%- for item in message['content'] -%}
      {%- if item['type'] == 'image' -%}
        {{ '<start_of_image>' }}
      {%- elif item['type'] == 'text' -%}
        {{ item['text'] | trim }}
      {%- endif -%}
    {%- endfor -%}
  {%- endif -%}
  {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{ '<start_of_turn>model\n' }}
{%- endif -%}
"""


def write_tokenizer_files(path: Path, *, model_max_length: int) -> Tokenizer:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja into ``path``."""
    tokenizer = build_tokenizer()
    tokenizer.save(str(path / "tokenizer.json"))
    added_tokens = {
        str(i): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, token in enumerate(SPECIAL_TOKENS)
    }
    config = {
        "tokenizer_class": "GemmaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "pad_token": "<pad>",
        "eos_token": "<eos>",
        "bos_token": "<bos>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
        # Gemma3Processor reads tokenizer.boi_token / eoi_token / image_token and their ids.
        "extra_special_tokens": {
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
        "added_tokens_decoder": added_tokens,
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "padding_side": "left",
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    # AutoProcessor reads its template only from chat_template.jinja; tokenizers read either file.
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return tokenizer
