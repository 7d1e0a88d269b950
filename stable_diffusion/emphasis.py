"""A1111's emphasis syntax: `(words)` weighs words 1.1 times, `[words]` 1 / 1.1 times, `(words:1.3)` 1.3 times;
brackets nest (their factors multiply) and `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` write the character itself.

The tokenizer gives each token the weight of its text (`parse`, `Tokenizer.__call__(..., prompt_weighting=True)`)
and the pipeline scales the CLIP hidden state of each token by it, keeping each chunk's mean (`weigh`), as A1111's
original emphasis does. Parsing follows A1111 case by case: an unmatched closing bracket is text, brackets still
open at the end close there, a backslash before any other character is dropped, and neighbouring pieces of equal
weight merge. Unlike A1111, a malformed weight such as `(a:1.2.3)` is text rather than an error, and `BREAK` is
plain text (chunks here are always 75 tokens).

References: AUTOMATIC1111/stable-diffusion-webui `modules/prompt_parser.py` (`parse_prompt_attention`),
`modules/sd_hijack_clip.py` (`process_tokens`) and `modules/sd_emphasis.py` (`EmphasisOriginal`).
"""
import re

ROUND, SQUARE = 1.1, 1 / 1.1
PIECES = re.compile(r"""
    \\[()\[\]\\]?                         # an escaped bracket or backslash; a lone backslash (dropped)
  | [(\[\]]                               # brackets, except round closing ones:
  | :\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)   # the end of (text:weight)
  | \)
  | [^\\()\[\]:]+                         # text
  | :
""", re.VERBOSE)


def parse(prompt):
    """The pieces of `prompt` with their weights, `[(text, weight)]`, text without the syntax.

    >>> parse("a (red:1.3) [square]")
    [('a ', 1.0), ('red', 1.3), (' ', 1.0), ('square', 0.9090909090909091)]
    """
    pieces, opened = [], {"(": [], "[": []}  # [text, weight]; where each open bracket started

    def multiply(start, factor):  # the pieces from `start` on
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in PIECES.finditer(prompt):
        text, weight = match.group(0), match.group(1)
        if text.startswith("\\"):
            pieces.append([text[1:], 1.0])
        elif text in ("(", "["):
            opened[text].append(len(pieces))
        elif weight is not None and opened["("]:
            multiply(opened["("].pop(), float(weight))
        elif text == ")" and opened["("]:
            multiply(opened["("].pop(), ROUND)
        elif text == "]" and opened["["]:
            multiply(opened["["].pop(), SQUARE)
        else:
            pieces.append([text, 1.0])
    for bracket, factor in (("(", ROUND), ("[", SQUARE)):  # still open: closed at the end
        for start in opened[bracket]:
            multiply(start, factor)
    merged = []
    for text, weight in pieces or [["", 1.0]]:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + text, weight)
        else:
            merged.append((text, weight))
    return merged


def weigh(states, weights):
    """A1111's emphasis on CLIP hidden states (N, L, width) of N chunks: each token's state times its weight (N, L),
    then each chunk scaled back to its former mean (A1111 takes the mean over its whole batch of prompts at once)."""
    weighted = states * weights[..., None]
    return weighted * (states.mean((1, 2), keepdims=True, dtype="float32")
                       / weighted.mean((1, 2), keepdims=True, dtype="float32")).astype(states.dtype)
