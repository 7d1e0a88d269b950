"""Tests for stable_diffusion/tokenizer.py.

Reference: transformers `CLIPTokenizer` (5.x, the `tokenizers` backend diffusers uses) loaded from the
same vocab.json/merges.txt, called with padding="max_length", truncation=True, max_length=77.
Tolerance: ids must be equal, for both pad tokens (SD 1.x "<|endoftext|>", SD 2.x "!"; with "!" the
reference turns every "!" of a prompt into id 0, diffusers issue #4153, and so must we).
"""

import copy
import json
import os
import random
import subprocess
import sys
import unicodedata
from pathlib import Path

import keras_hub
import numpy as np
import pytest
from transformers import CLIPTokenizer

from stable_diffusion.tokenizer import Tokenizer

START, END = 49406, 49407

SPECIAL_PROMPTS = [
    "",
    " ",
    "\t\n",
    "a photo of an astronaut riding a horse on mars",
    "A PHOTO OF AN ASTRONAUT",
    "HeLLo WoRLD, MiXeD CaSe",
    "  leading spaces",
    "trailing spaces   ",
    "many     repeated      spaces",
    "tabs\tand\ttabs",
    "new\nlines\r\nand\rcarriage returns",
    "mixed \t\n whitespace \u00a0 nbsp \u3000 ideographic \u2009 thin",
    "zero\u200bwidth space",
    "don't stop, it's fine, we're here, they've gone, I'm sure, you'll see, he'd go",
    "DON'T SHOUT IT'S LOUD",
    "curly apostrophes don\u2019t and it\u2019s",
    "rock 'n' roll 'quoted' \"double\" `back`",
    "well-known state-of-the-art self-portrait",
    "em\u2014dash en\u2013dash minus\u2212sign -- ---",
    "hello!!! what?!? wow... ok;;; (a) [b] {c} <d>",
    "symbols @#$%^&*_+=|\\/~` and ©®™ °±§¶",
    "1024x768 3.14 2nd 100% 1,000,000 $5 v1.5 4k 8K 16:9",
    "0123456789 9876543210",
    "café crème brûlée",
    "über schöne Grüße aus München, STRASSE straße",
    "niño piñata España señor",
    "Ångström naïve façade coöperate Øresund Łódź",
    "e\u0301 combining acute (NFD) cafe\u0301",
    "İstanbul ǅemal ﬁne ligature",
    "一只猫坐在窗台上，阳光明媚。",
    "中文 english 混合 mixed",
    "Красивый закат над морем",
    "ПРИВЕТ мир Ёлка",
    "日本語のテキスト カタカナ ひらがな",
    "한국어 텍스트 서울",
    "Ελληνικά γράμματα ΑΒΓ",
    "العربية نص",
    "עברית טקסט",
    "हिन्दी पाठ",
    "ไทย ภาษา",
    "emoji 🐱 🎉 🚀",
    "👩\u200d🚀 astronaut zwj and 👍🏽 skin tone and 🇫🇷 flag",
    "❤️ ✨ ☀ ⭐ keycap 1️⃣",
    "ｆｕｌｌｗｉｄｔｈ ＴＥＸＴ １２３",
    "math ∑∫√∞ ≤≥≠ αβγ",
    "control\x00chars\x07here\x1b",
    "<|startoftext|> literal start",
    "literal end <|endoftext|> in the middle",
    "<|ENDOFTEXT|> uppercase special",
    "a <b>html</b> &amp; entity &lt;",
    "!",
    "!!",
    "! !! !!! !!!!",
    "hi!there",
    "masterpiece, best quality, (ultra detailed:1.2), [lowres], {{bad anatomy}}",
    "photo,of,a,cat,without,spaces",
    "a" * 300,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    " ".join(["word"] * 76),
    " ".join(["word"] * 75),
    " ".join(["word"] * 74),
    " ".join(["word"] * 200),
    "a highly detailed " * 30,
]

FRAGMENTS = [
    "a photo of", "portrait of", "an oil painting of", "a cat", "a dog", "the Eiffel Tower", "New York",
    "cyberpunk city", "at sunset", "trending on artstation", "8k", "4K UHD", "f/1.8", "35mm",
    "by Greg Rutkowski", "don't", "it's", "state-of-the-art", "high-res", "café", "Müller", "piñata", "Ærø",
    "東京", "上海", "Москва", "котик", "😀", "🌸", "🐉", "!", "?", "...", ",", ";", ":", "(", ")", "[", "]", "'",
    '"', "-", "--", "_", "#1", "2024", "3.5", "x2", "100%", "naïve", "ÉCOLE", "Zürich", "İ", "ß", "ﬂ",
    "\u00a0", "\t", "\n",
]
SEPARATORS = [" ", "  ", ", ", ",", "\t", "\n", " - ", "", "   "]


def generated_prompts(n, seed=0):
    """`n` prompts built deterministically from FRAGMENTS, with random case, separators and lengths."""
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        words = rng.choices(FRAGMENTS, k=rng.choice([1, 3, 8, 20, 60]))
        text = "".join(word + rng.choice(SEPARATORS) for word in words)
        case = i % 4
        text = text.upper() if case == 1 else text.title() if case == 2 else text
        if i % 7 == 0:
            text = unicodedata.normalize("NFD", text)
        prompts.append(" " * (i % 3) + text)
    return prompts


PROMPTS = SPECIAL_PROMPTS + generated_prompts(240)


@pytest.fixture(scope="module")
def tokenizer():
    """SD 1.x tokenizer (pads with the end token), built once."""
    return Tokenizer.from_vendored()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer):
    """vocab.json and merges.txt written from the vendored BPE file."""
    path = tmp_path_factory.mktemp("tokenizer")
    (path / "vocab.json").write_text(json.dumps(tokenizer.vocabulary), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(tokenizer.merges) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module", params=["<|endoftext|>", "!"], ids=["pad_end", "pad_bang"])
def tokenizers(request, folder, tokenizer):
    """(ours, transformers reference) for one pad token."""
    ours = Tokenizer(tokenizer.vocabulary, tokenizer.merges, pad_token_id=tokenizer.vocabulary[request.param])
    reference = CLIPTokenizer.from_pretrained(folder, pad_token=request.param, model_max_length=77)
    return ours, reference


def test_vocabulary_matches_openai_layout(tokenizer):
    assert len(tokenizer.vocabulary) == 49408
    assert len(tokenizer.merges) == 48894
    assert tokenizer.vocabulary["!"] == 0
    assert tokenizer.vocabulary["<|startoftext|>"] == START
    assert tokenizer.vocabulary["<|endoftext|>"] == END


def test_known_ids(tokenizer):
    """Ids of the diffusers README prompt with the SD 1.5 tokenizer (openai/clip-vit-large-patch14)."""
    ids = tokenizer("a photo of an astronaut riding a horse on mars")
    expected = [START, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, END]
    assert ids.shape == (1, 77)
    assert ids.dtype == np.int32
    assert ids[0].tolist() == expected + [END] * (77 - len(expected))


def test_prompt_set_is_large_and_covers_long_prompts(tokenizer):
    lengths = [len(ids) + 2 for ids in tokenizer.bpe_ids(PROMPTS)]
    assert len(PROMPTS) >= 200
    assert sum(length > 77 for length in lengths) >= 20
    assert sum(length <= 77 for length in lengths) >= 100


def test_matches_transformers(tokenizers):
    ours, reference = tokenizers
    with pytest.warns(UserWarning):
        ids = ours(PROMPTS)
    expected = reference(PROMPTS, padding="max_length", truncation=True, max_length=77).input_ids
    mismatches = [(p, a.tolist(), b) for p, a, b in zip(PROMPTS, ids, expected) if a.tolist() != b]
    assert not mismatches, f"{len(mismatches)} of {len(PROMPTS)} prompts differ, first: {mismatches[0]}"


def test_structure_and_padding(tokenizers):
    ours, _ = tokenizers
    ids = ours(["", "a cat"])
    pad = ours.pad_token_id
    assert ids.shape == (2, 77) and ids.dtype == np.int32
    assert ids[0].tolist() == [START, END] + [pad] * 75
    assert ids[1, :4].tolist() == [START, 320, 2368, END]
    assert (ids[1, 4:] == pad).all()


def test_string_and_list_agree(tokenizer):
    np.testing.assert_array_equal(tokenizer("a red car"), tokenizer(["a red car"]))
    assert tokenizer(("one", "two")).shape == (2, 77)


def test_truncation_warns_and_keeps_end_token(tokenizer):
    with pytest.warns(UserWarning, match=r"truncated.*last 25 of its 102 tokens were dropped"):
        ids = tokenizer(" ".join(["word"] * 100))
    assert ids[0, 0] == START and ids[0, -1] == END
    assert (ids[0, 1:-1] == 2653).all()


def test_no_warning_at_exact_length(tokenizer, recwarn):
    tokenizer(" ".join(["word"] * 75))
    assert not recwarn.list


def test_long_prompts_in_chunks(tokenizer, recwarn):
    """Chunks of 75 BPE ids, each with start and end tokens and padded to 77, as many as the longest prompt
    needs (at least `min_chunks`); shorter prompts get chunks of padding only. Nothing is dropped."""
    ids = tokenizer([" ".join(["word"] * 100), "a cat"], long_prompts=True)  # "word" is id 2653
    assert ids.shape == (2, 154) and ids.dtype == np.int32 and not recwarn.list
    chunks = ids.reshape(2, 2, 77)
    assert (chunks[..., 0] == START).all()
    assert (chunks[0, 0, 1:76] == 2653).all() and chunks[0, 0, 76] == END
    assert (chunks[0, 1, 1:26] == 2653).all() and (chunks[0, 1, 26:] == END).all()  # 25 more ids, then padding
    np.testing.assert_array_equal(chunks[1, 0], tokenizer("a cat")[0])
    assert (chunks[1, 1, 1:] == END).all()
    np.testing.assert_array_equal(tokenizer("a cat", long_prompts=True), tokenizer("a cat"))
    assert tokenizer("a cat", long_prompts=True, min_chunks=3).shape == (1, 231)


@pytest.mark.parametrize("bad", [None, 3, b"bytes", [], ["ok", 7], ["ok", None]])
def test_rejects_non_strings(tokenizer, bad):
    with pytest.raises(ValueError, match=r"prompt must (be a string or a non-empty list of strings|hold strings only), got"):
        tokenizer(bad)


@pytest.mark.parametrize(
    "pad_token, config",
    [
        ("<|endoftext|>", {"tokenizer_config.json": {"pad_token": "<|endoftext|>"}}),
        ("!", {"special_tokens_map.json": {"pad_token": {"content": "!", "lstrip": False}}}),
        ("!", {"tokenizer_config.json": {"pad_token": "<|endoftext|>"}, "special_tokens_map.json": {"pad_token": "!"}}),
        ("<|endoftext|>", {"tokenizer_config.json": {"model_max_length": 77}}),
    ],
)
def test_from_folder_reads_pad_token(tmp_path, folder, pad_token, config):
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    for name, content in config.items():
        (tmp_path / name).write_text(json.dumps(content))
    tokenizer = Tokenizer.from_folder(tmp_path)
    assert tokenizer.pad_token == pad_token
    assert tokenizer.pad_token_id == tokenizer.vocabulary[pad_token]


def test_save_round_trip(tmp_path, tokenizers):
    tokenizer, _ = tokenizers
    tokenizer.save(tmp_path)
    loaded = Tokenizer.from_folder(tmp_path)
    reference = CLIPTokenizer.from_pretrained(tmp_path)
    prompts = PROMPTS[:40]
    assert loaded.vocabulary == tokenizer.vocabulary and loaded.merges == tokenizer.merges
    assert loaded.pad_token_id == tokenizer.pad_token_id
    np.testing.assert_array_equal(loaded(prompts), tokenizer(prompts))
    assert reference.pad_token == tokenizer.pad_token and reference.model_max_length == 77
    expected = reference(prompts, padding="max_length", truncation=True, max_length=77).input_ids
    assert loaded(prompts).tolist() == expected


ADDED = ["<Cat-Toy>", "mytok", "mytok_1", "my tok"]  # textual-inversion tokens; mytok_1: mytok's second vector
ADDED_PROMPTS = ["a <Cat-Toy> b", "A <CAT-TOY>b", "x<cat-toy>y!!", "café<cat-toy>", "my  tok, MY\ttok!",
                 "a mytok, mytok.", "<cat-toy> mytok " * 30, "a photo of a cat"]


def test_added_tokens_equal_transformers(tmp_path, tokenizers):
    """transformers' added tokens (matched whole in the normalized text); an added token t stands for t, t_1, ...
    as diffusers' `maybe_convert_prompt` makes it; the tokens survive `save` for us and for transformers."""
    tokenizer, reference = tokenizers
    ours, reference = Tokenizer(tokenizer.vocabulary, tokenizer.merges, tokenizer.pad_token_id), copy.copy(reference)
    reference.add_tokens(ADDED)
    ours.add_tokens({token: reference.convert_tokens_to_ids(token) for token in ADDED})
    converted = [prompt.replace("mytok", "mytok mytok_1") for prompt in ADDED_PROMPTS]  # as diffusers converts
    expected = reference(converted, padding="max_length", truncation=True, max_length=77).input_ids
    with pytest.warns(UserWarning, match="truncated"):
        assert ours(ADDED_PROMPTS).tolist() == expected
    ours.save(tmp_path)
    with pytest.warns(UserWarning, match="truncated"):
        assert Tokenizer.from_folder(tmp_path)(ADDED_PROMPTS).tolist() == expected
    again = CLIPTokenizer.from_pretrained(tmp_path)
    assert again(converted, padding="max_length", truncation=True, max_length=77).input_ids == expected
    reference.save_pretrained(tmp_path / "transformers")
    assert Tokenizer.from_folder(tmp_path / "transformers").added_tokens == ours.added_tokens
    assert tokenizer.added_tokens == {}, "the fixture's tokenizer changed"


@pytest.mark.parametrize("tokens, message", [
    ({"a</w>": 49408}, "'a</w>' is already in"),
    ({"<|endoftext|>": 49408}, "already in"),
    ({"<tok>": 49408, "<TOK>": 49409}, "'<TOK>' is already in"),
    ({" ": 49408}, "non-empty string"),
])
def test_add_tokens_refuses_taken_tokens_adding_none(tokenizer, tokens, message):
    ours = Tokenizer(tokenizer.vocabulary, tokenizer.merges)
    with pytest.raises(ValueError, match=message):
        ours.add_tokens(tokens)
    assert ours.added_tokens == {}


@pytest.mark.parametrize("missing", ["vocab.json", "merges.txt", "tokenizer_config.json"])
def test_from_folder_missing_file(tokenizer, tmp_path, missing):
    tokenizer.save(tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        Tokenizer.from_folder(tmp_path)


def test_unknown_pad_token(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"}))
    with pytest.raises(ValueError, match="<pad>"):
        Tokenizer.from_folder(tmp_path)
    with pytest.raises(ValueError, match="<pad>"):
        Tokenizer.from_vendored(pad_token="<pad>")
    with pytest.raises(ValueError, match="123456"):
        Tokenizer(tokenizer.vocabulary, tokenizer.merges, pad_token_id=123456)


@pytest.mark.slow  # 25 s on 2 AVX2 cores: TensorFlow's lookup tables of the vocabulary, and traces
def test_tensorflow_path_built_on_first_use():
    """keras-hub's TensorFlow path (tf.data, tf.function) gives the Python path's ids (for lowercase
    prompts: that path does not lowercase). Its tables are not built with the tokenizer but when first
    traced, and outlive that trace: a second pipeline reuses them."""
    tf = pytest.importorskip("tensorflow")
    fresh = Tokenizer.from_vendored()
    assert fresh.bpe.cache is None
    prompts = ["a cat 🐱", "wow!!", "a photo of an astronaut, riding a horse on mars"]
    expected = [list(ids) for ids in fresh.bpe(prompts)]
    for _ in range(2):
        mapped = tf.data.Dataset.from_tensor_slices(prompts).map(fresh.bpe)
        assert [ids.numpy().tolist() for ids in mapped] == expected
    assert fresh.bpe.cache is not None
    traced = tf.function(fresh.bpe)(tf.constant(prompts))
    assert traced.to_list() == expected


BLOCK_TENSORFLOW = """import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "tensorflow_text"):
            raise ImportError(name)
sys.meta_path.insert(0, Block())
"""


KERAS_HUB_NEEDS_TENSORFLOW = """import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name == "keras_hub" and sys.modules.get("tensorflow", 0) is None:
            raise ImportError("this keras-hub needs TensorFlow")
sys.meta_path.insert(0, Refuse())
"""


@pytest.mark.parametrize("backend, prelude, imported", [
    ("torch", "", False), ("jax", BLOCK_TENSORFLOW, False), ("torch", KERAS_HUB_NEEDS_TENSORFLOW, True)],
    ids=["torch", "jax_without_tensorflow", "torch_keras_hub_needing_tensorflow"])
def test_other_backends(tokenizer, backend, prelude, imported):
    """The same ids, as NumPy, when Keras runs on torch or JAX, also where TensorFlow is not installed
    (keras-hub then takes its `tokenizers` path only); where it is, it stays unimported (`import_keras_hub`), unless
    keras-hub cannot be imported without it."""
    prompts = ["a cat 🐱", "wow!!", "A photo of an astronaut, riding a horse on Mars"]
    script = prelude + f"from stable_diffusion.tokenizer import Tokenizer; ids = Tokenizer.from_vendored()({prompts!r})\n"
    script += "print(type(ids).__name__, ids.dtype, ids.tolist(), 'tensorflow' in sys.modules)"
    env = {**os.environ, "KERAS_BACKEND": backend}
    root = Path(__file__).parent.parent
    result = subprocess.run([sys.executable, "-c", "import sys\n" + script], env=env, cwd=root,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    expected = tokenizer(prompts).tolist()
    assert result.stdout.strip().splitlines()[-1] == f"ndarray int32 {expected} {imported}"


def test_keras_hub_without_the_private_methods_serves_as_it_is(tokenizer, monkeypatch):
    """Where keras-hub lacks a private method `CLIPBytePairTokenizer` overrides, its own CLIPTokenizer
    is used, with the same ids."""
    owner = next(c for c in keras_hub.models.CLIPTokenizer.__mro__ if "_maybe_initialized_tf" in vars(c))
    monkeypatch.delattr(owner, "_maybe_initialized_tf")
    plain = Tokenizer.from_vendored()
    assert type(plain.bpe) is keras_hub.models.CLIPTokenizer
    prompts = ["a cat 🐱", "wow!!", "a photo of an astronaut, riding a horse on mars"]
    np.testing.assert_array_equal(plain(prompts), tokenizer(prompts))
