"""CLIP BPE tokenizer for Stable Diffusion prompts.

Glue around `keras_hub.models.CLIPTokenizer` (byte-level BPE) and `keras_hub.layers.StartEndPacker`
(start/end tokens, truncation, padding). Both run on their pure-Python path (the `tokenizers`
library), so the tokenizer works under every Keras backend and returns NumPy; on backends other than TensorFlow,
keras-hub is imported without it (`keras_internals.import_keras_hub`).

The ids match transformers' `CLIPTokenizer` (transformers 5.x, which diffusers uses): NFC, every
whitespace run to one space, lowercase, CLIP's pre-split regex, byte-level BPE. keras-hub builds the
identical `tokenizers` pipeline, so no text pre-processing is needed. One transformers behaviour is
reproduced here: the pad token is a special token, matched in the raw text before BPE. For SD 2.x
(pad "!") every "!" in a prompt therefore becomes id 0, unlike open_clip ("!!" is 748 there); see
diffusers issue #4153. Tokens added for textual-inversion embeddings (`add_tokens`) are transformers'
added tokens: matched whole in the normalized text (NFC, whitespace runs as one space, lowercase), before
BPE. An added token t stands for t, t_1, t_2, ... (those added), as diffusers expands multi-vector embeddings.

References:
- OpenAI CLIP `clip/simple_tokenizer.py` and open_clip `tokenizer.py`: vocabulary built from the BPE
  merges file (shipped as `assets/bpe_simple_vocab_16e6.txt.gz`, MIT licence beside it).
- transformers `models/clip/tokenization_clip.py`: the ids we match.
- diffusers `StableDiffusionPipeline.encode_prompt`: the warning on truncated prompts;
  `loaders/textual_inversion.py` (`_maybe_convert_prompt`): multi-vector tokens.
"""

import gzip
import json
import re
import unicodedata
import warnings
from pathlib import Path

import keras
import numpy as np

from . import emphasis
from .arguments import check_prompts
from .keras_internals import clip_tokenizer, keras_hub
from .presets import asset
from .weights import CheckpointError, read_json

START_TOKEN, END_TOKEN = "<|startoftext|>", "<|endoftext|>"


def byte_characters():
    """The 256 printable characters byte-level BPE uses for the bytes 0..255, in CLIP vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    n_others = 256 - len(printable)
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(n_others)]


def normalize(text):
    """CLIP's normalizer (transformers / `tokenizers`): NFC, every whitespace run to one space, lowercase."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).lower()


def added_tokens(configs, fast, vocabulary, sources):
    """{token: id} of the added tokens, not special and not in `vocabulary`, that a tokenizer folder lists
    (transformers 4 in tokenizer_config.json's `added_tokens_decoder`, 5 in tokenizer.json's `added_tokens`);
    a CheckpointError naming `sources` if a listing is malformed."""
    try:
        added = [dict(token, id=int(i)) for c in configs for i, token in c.get("added_tokens_decoder", {}).items()]
        added += [dict(token) for token in fast.get("added_tokens", [])]
        return {token["content"]: int(token["id"]) for token in added
                if not token.get("special") and token["content"] not in vocabulary}
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"The added tokens of {sources} are malformed ({error!r}).") from error


def pad_id(vocabulary, pad_token, source):
    """Id of `pad_token`, or a CheckpointError naming the token and where it came from."""
    if not isinstance(pad_token, str) or pad_token not in vocabulary:
        raise CheckpointError(f"Pad token {pad_token!r} from {source} is not in the vocabulary.")
    return vocabulary[pad_token]


def read_lines(path):
    """The lines of a UTF-8 text file; CheckpointError naming it if it is not UTF-8."""
    try:
        return path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise CheckpointError(f"{path} is not UTF-8 text: {error}") from error


def check_vocabulary(vocabulary, merges, sources):
    """CheckpointError naming the file (`sources`: of the vocabulary, of the merges) unless the vocabulary
    maps strings to the ids 0..n-1 and holds the start and end tokens, and every merge rule is two tokens
    of the vocabulary, a space between them, whose concatenation is in the vocabulary too."""
    if not (isinstance(vocabulary, dict) and START_TOKEN in vocabulary and END_TOKEN in vocabulary
            and all(type(i) is int and 0 <= i < len(vocabulary) for i in vocabulary.values())):
        raise CheckpointError(f"{sources[0]} is not a vocabulary: an object of tokens to the ids 0 to its size - 1, "
                              f"{START_TOKEN} and {END_TOKEN} among them.")
    for merge in merges if isinstance(merges, list) else [merges]:
        if isinstance(merge, str) and (not merge or merge.startswith("#version")):
            continue  # as `Tokenizer` skips them
        pair = merge.split(" ") if isinstance(merge, str) else []
        if not (len(pair) == 2 and pair[0] in vocabulary and pair[1] in vocabulary and "".join(pair) in vocabulary):
            raise CheckpointError(f"{sources[1]} has the merge rule {merge!r:.80}, not two tokens of the "
                                  f"vocabulary ({sources[0]}), a space between them, whose concatenation is in it.")


class Tokenizer:
    """Prompts to `(B, sequence_length)` int32 ids: start token, BPE ids, end token, padding; long prompts
    optionally in several chunks of that layout.

    Args:
        vocabulary: dict mapping token string to id (the contents of `vocab.json`).
        merges: list of merge rules, `"a b"` strings in priority order (the lines of `merges.txt`; a
            `#version` header line is ignored).
        pad_token_id: id written after the end token. SD 1.x pads with the end token (49407),
            SD 2.x with `"!"` (0). The pad token is special, as in transformers: where it appears in a
            prompt it becomes this id instead of going through BPE.
        sequence_length: length of every output row, start and end tokens included.
    """

    def __init__(self, vocabulary, merges, pad_token_id=49407, sequence_length=77):
        if pad_token_id not in vocabulary.values():
            raise ValueError(f"pad_token_id {pad_token_id} is not an id of the vocabulary.")
        self.vocabulary = dict(vocabulary)
        self.merges = [merge for merge in merges if merge and not merge.startswith("#version")]
        self.pad_token_id = pad_token_id
        self.sequence_length = sequence_length
        self.bpe = clip_tokenizer(self.vocabulary, self.merges)
        self.pad_token = self.bpe.id_to_token(pad_token_id)
        self.packer = keras_hub.layers.StartEndPacker(
            sequence_length,
            start_value=self.bpe.start_token_id,
            end_value=self.bpe.end_token_id,
            pad_value=pad_token_id,
        )
        self.added_tokens, self.added_pattern = {}, None  # {normalized token: id}, the regex that finds them

    def __call__(self, prompts, *, long_prompts=False, prompt_weighting=False, min_chunks=1, return_weights=False):
        """Tokenize a prompt or a list of prompts.

        Args:
            prompts: a string or a non-empty list of strings. Prompts longer than `sequence_length`
                tokens are truncated (with a warning) so that the last token is still the end token.
            long_prompts: instead of truncating, split every prompt into k chunks of
                `sequence_length - 2` BPE tokens, k as many as the longest prompt needs, each chunk with
                start and end tokens and padded; shorter prompts get padding-only chunks.
            prompt_weighting: read A1111's emphasis syntax, `(words:1.3)` (`emphasis.py`): the ids are those
                of the text without the syntax, each token weighted as its text.
            min_chunks: with `long_prompts`, the least k (a positive integer).
            return_weights: also return the tokens' weights.

        Returns:
            `np.ndarray` of int32, shape `(B, sequence_length)`; with `long_prompts` `(B, k * sequence_length)`.
            With `return_weights`, (ids, weights): float32 weights of the ids' shape, 1 for start, end and
            padding tokens and for every token without `prompt_weighting`.
        """
        prompts = check_prompts(prompts)
        if not isinstance(min_chunks, int) or min_chunks < 1:
            raise ValueError(f"min_chunks must be a positive integer, got {min_chunks!r}.")
        parsed = [emphasis.parse(prompt) if prompt_weighting else [(prompt, 1.0)] for prompt in prompts]
        text_ids = iter(self.bpe_ids([text for texts in parsed for text, _ in texts]))  # one list per text
        weighted = [[(i, weight) for _, weight in texts for i in next(text_ids)] for texts in parsed]  # (id, weight)
        rows, kept = [[i for i, _ in row] for row in weighted], self.sequence_length - 2
        chunks = max(min_chunks, *(-(-len(ids) // kept) for ids in rows)) if long_prompts else 1
        for i, ids in enumerate(rows):
            if len(ids) > kept * chunks:  # without long_prompts
                warnings.warn(
                    f"Prompt {i} was truncated: CLIP takes at most {self.sequence_length} tokens, "
                    f"so the last {len(ids) - kept} of its {len(ids) + 2} tokens were dropped.",
                    stacklevel=2,
                )
        pieces = [ids[k * kept:(k + 1) * kept] for ids in rows for k in range(chunks)]
        ids = keras.ops.convert_to_numpy(self.packer(pieces)).astype("int32")  # (B * chunks, sequence_length)
        ids = ids.reshape(len(rows), chunks * self.sequence_length)
        if not return_weights:
            return ids
        weights = np.ones((len(rows), chunks, self.sequence_length), "float32")
        for row, chunk_weights in zip(weighted, weights):
            for k, chunk in enumerate(chunk_weights):
                part = [weight for _, weight in row[k * kept:(k + 1) * kept]]
                chunk[1:1 + len(part)] = part  # after the start token
        return ids, weights.reshape(ids.shape)

    def bpe_ids(self, prompts):
        """B lists of ids without start/end tokens; the pad token and added tokens map to their ids, not to BPE."""
        splits = [self.split(prompt) for prompt in prompts]
        ids = iter(self.bpe([piece for split in splits for piece in split if isinstance(piece, str)]))
        return [[i for piece in split for i in (next(ids) if isinstance(piece, str) else piece)] for split in splits]

    def split(self, prompt):
        """`prompt` in pieces: text for BPE, and lists of the ids of the pad token (matched in the raw text) and
        of added tokens (in the normalized text)."""
        pieces = []
        for n, text in enumerate(prompt.split(self.pad_token)):
            pieces += [[self.pad_token_id]] if n else []
            parts = self.added_pattern.split(normalize(text)) if self.added_tokens else [text]
            pieces += [self.expand(part) if k % 2 else part for k, part in enumerate(parts)]  # odd: tokens
        return pieces

    def expand(self, token):
        """The ids of an added token t and of the t_1, t_2, ... added after it (a multi-vector embedding)."""
        ids = [self.added_tokens[token]]
        while f"{token}_{len(ids)}" in self.added_tokens:
            ids.append(self.added_tokens[f"{token}_{len(ids)}"])
        return ids

    def add_tokens(self, tokens):
        """Adds tokens matched whole in prompts (see the module docstring), e.g. for textual inversion.

        Args:
            tokens: {token: id}: new ids for non-empty strings that are neither in the vocabulary nor added
                before, also once normalized.

        Raises ValueError naming the first token that is taken, adding none.
        """
        names = self.vocabulary.keys() | self.added_tokens.keys()
        for token in tokens:
            if not isinstance(token, str) or not token.strip():
                raise ValueError(f"A token must be a non-empty string, got {token!r}.")
            if token in names or normalize(token) in names:
                raise ValueError(f"Token {token!r} is already in the tokenizer's vocabulary.")
            names.add(normalize(token))
        # a new dict, so that a copy of this tokenizer keeps its own
        self.added_tokens = {**self.added_tokens, **{normalize(token): i for token, i in tokens.items()}}
        longest_first = sorted(self.added_tokens, key=len, reverse=True)  # matches are leftmost-longest
        self.added_pattern = re.compile(f"({'|'.join(map(re.escape, longest_first))})")

    @classmethod
    def from_folder(cls, path):
        """Tokenizer from a diffusers/transformers tokenizer folder.

        Args:
            path: folder holding `vocab.json` and `merges.txt` (or `tokenizer.json`), and
                `special_tokens_map.json` and/or
                `tokenizer_config.json`. The pad token is read from `special_tokens_map.json` first
                (it overrides `tokenizer_config.json`, as in transformers), and defaults to
                `<|endoftext|>` like transformers' `CLIPTokenizer`.
        """
        folder = Path(path)
        fast_path = folder / "tokenizer.json"
        fast = read_json(fast_path) if fast_path.exists() else {}
        if (folder / "vocab.json").exists() or not fast_path.exists():
            sources = folder / "vocab.json", folder / "merges.txt"
            vocabulary, merges = read_json(sources[0]), read_lines(sources[1])
        else:  # transformers 5 writes only the `tokenizers` file
            sources, model = (fast_path,) * 2, fast.get("model")
            vocabulary, merges = (model.get("vocab"), model.get("merges")) if isinstance(model, dict) else (None, None)
            if isinstance(merges, list):  # pairs, or "a b" strings as in merges.txt
                merges = [" ".join(m) if isinstance(m, list) and all(isinstance(t, str) for t in m) else m
                          for m in merges]
        check_vocabulary(vocabulary, merges, sources)
        config_paths = [p for p in (folder / "special_tokens_map.json", folder / "tokenizer_config.json") if p.exists()]
        if not config_paths:
            raise FileNotFoundError(f"Neither special_tokens_map.json nor tokenizer_config.json found in {folder}.")
        configs = [read_json(p) for p in config_paths]
        pad_token = next((c["pad_token"] for c in configs if c.get("pad_token")), END_TOKEN)
        if isinstance(pad_token, dict):
            pad_token = pad_token.get("content")
        tokenizer = cls(vocabulary, merges, pad_token_id=pad_id(vocabulary, pad_token, config_paths))
        added = added_tokens(configs, fast, vocabulary, config_paths)
        try:
            tokenizer.add_tokens(added)
        except ValueError as error:
            raise CheckpointError(f"{config_paths}: {error}") from error
        return tokenizer

    @classmethod
    def from_vendored(cls, pad_token=END_TOKEN):
        """Tokenizer from the vendored OpenAI BPE file, built exactly as CLIP's `simple_tokenizer.py` does.

        Args:
            pad_token: `"<|endoftext|>"` for SD 1.x, `"!"` for SD 2.x.
        """
        path = asset("bpe_simple_vocab_16e6.txt.gz")
        with gzip.open(path, "rt", encoding="utf-8") as f:
            merges = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]
        characters = byte_characters()
        tokens = characters + [c + "</w>" for c in characters] + ["".join(m.split()) for m in merges]
        vocabulary = {token: i for i, token in enumerate(tokens + [START_TOKEN, END_TOKEN])}
        return cls(vocabulary, merges, pad_token_id=pad_id(vocabulary, pad_token, path.name))

    def save(self, folder):
        """Write `vocab.json`, `merges.txt` and `tokenizer_config.json`, readable by `from_folder`
        and by transformers' `CLIPTokenizer.from_pretrained`; added tokens go to `tokenizer_config.json`'s
        `added_tokens_decoder`, as transformers 4 writes them.

        Args:
            folder: directory to write into; created if missing.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(self.vocabulary, ensure_ascii=False), encoding="utf-8")
        (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *self.merges]) + "\n", encoding="utf-8")
        config = {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": self.sequence_length,
            "pad_token": self.pad_token,
            "added_tokens_decoder": {str(i): dict(content=token, lstrip=False, normalized=True, rstrip=False,
                                                  single_word=False, special=False)
                                     for token, i in self.added_tokens.items()},
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
