"""Ids checked against outputs of the released tokenizer, not of anything in this repo.

* Spec §2.1 reference encodings (HF's Qwen2 docstring and the spec's own checks).
* llama.cpp's tokenizer conformance vectors for Qwen2 (`models/ggml-vocab-qwen2.gguf.inp`
  / `.out`, MIT licence, shipped in the llama-cpp-python 0.3.36 sdist): 46 strings and the
  ids HF `transformers` gave for them with the released Qwen2 tokenizer (same regular
  vocabulary as Qwen2.5). Copied verbatim below.
* The sha256 of the official vocabulary and merge list (computed from that release's
  tokenizer as converted in `ggml-vocab-qwen2.gguf`) against what we derive from the ranks.
"""

from __future__ import annotations

import pytest
from test_tokenizer_support import SPEC_CONTROL, auto_tokenizer, builtin, exported_dir

from qwen25.tokenizer import qwen

SPEC_ENCODINGS = [
    ("Hello world", [9707, 1879]),
    (" Hello world", [21927, 1879]),
    ("你好，世界", [108386, 3837, 99489]),
    ("def f(x):\n    return x", [750, 282, 2075, 982, 262, 470, 856]),
    ("2024", [17, 15, 17, 19]),
]

LLAMA_CPP_QWEN2_VECTORS = [
    ('ied 4 ½ months',
     [1122, 220, 19, 220, 26062, 3951]),
    ('Äpfel',
     [86975, 15897, 301]),
    ('',
     []),
    (' ',
     [220]),
    ('  ',
     [256]),
    ('   ',
     [262]),
    ('\t',
     [197]),
    ('\n',
     [198]),
    ('\n\n',
     [271]),
    ('\n\n\n',
     [1406]),
    ('\t\n',
     [1572]),
    ('Hello world',
     [9707, 1879]),
    (' Hello world',
     [21927, 1879]),
    ('Hello World',
     [9707, 4337]),
    (' Hello World',
     [21927, 4337]),
    (' Hello World!',
     [21927, 4337, 0]),
    ('Hello, world!',
     [9707, 11, 1879, 0]),
    (' Hello, world!',
     [21927, 11, 1879, 0]),
    (' this is 🦙.cpp',
     [419, 374, 11162, 99, 247, 13, 10821]),
    ('w048 7tuijk dsdfhu',
     [86, 15, 19, 23, 220, 22, 83, 1963, 41808, 11472, 2940, 16739]),
    ('нещо на Български',
     [78762, 14144, 1456, 13073, 63471, 33594, 3038, 133178, 79012]),
    ('កាន់តែពិសេសអាចខលចេញ',
     [146394, 97529, 241, 44258, 233, 146568, 44258, 224, 147603, 20879, 115, 146280, 44258, 223, 146280, 147272, 97529, 227, 147805, 148301, 147270, 44258, 223, 146848]),
    ('🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ (only emoji that has its own token)',
     [145836, 320, 8252, 8, 26525, 114, 378, 235, 149921, 30543, 320, 35673, 99066, 97534, 8, 25521, 227, 320, 3243, 42365, 429, 702, 1181, 1828, 3950, 8]),
    ('Hello',
     [9707]),
    (' Hello',
     [21927]),
    ('  Hello',
     [220, 21927]),
    ('   Hello',
     [256, 21927]),
    ('    Hello',
     [262, 21927]),
    ('    Hello\n    Hello',
     [262, 21927, 198, 262, 21927]),
    (' (',
     [320]),
    ('\n =',
     [198, 284]),
    ("' era",
     [6, 11385]),
    ("Hello, y'all! How are you 😁 ?我想在apple工作1314151天～",
     [9707, 11, 379, 64848, 0, 2585, 525, 498, 26525, 223, 937, 104100, 18493, 22377, 99257, 16, 18, 16, 19, 16, 20, 16, 35727, 21216]),
    ('!!!!!!',
     [17085, 2928]),
    ('3',
     [18]),
    ('33',
     [18, 18]),
    ('333',
     [18, 18, 18]),
    ('3333',
     [18, 18, 18, 18]),
    ('33333',
     [18, 18, 18, 18, 18]),
    ('333333',
     [18, 18, 18, 18, 18, 18]),
    ('3333333',
     [18, 18, 18, 18, 18, 18, 18]),
    ('33333333',
     [18, 18, 18, 18, 18, 18, 18, 18]),
    ('333333333',
     [18, 18, 18, 18, 18, 18, 18, 18, 18]),
    ('Cửa Việt',
     [34, 90063, 128324]),
    (' discards',
     [2560, 2347]),
    ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL',
     [198, 4710, 14731, 65497, 7847, 1572, 2303, 78672, 10947, 145836, 320, 8252, 8, 26525, 114, 378, 235, 149921, 30543, 320, 35673, 99066, 97534, 8, 25521, 227, 11162, 99, 247, 149955, 220, 18, 220, 18, 18, 220, 18, 18, 18, 220, 18, 18, 18, 18, 220, 18, 18, 18, 18, 18, 220, 18, 18, 18, 18, 18, 18, 220, 18, 18, 18, 18, 18, 18, 18, 220, 18, 18, 18, 18, 18, 18, 18, 18, 220, 18, 13, 18, 220, 18, 496, 18, 220, 18, 1112, 18, 220, 146394, 97529, 241, 44258, 233, 146568, 44258, 224, 147603, 20879, 115, 146280, 44258, 223, 146280, 147272, 97529, 227, 144534, 937, 104100, 18493, 22377, 99257, 16, 18, 16, 19, 16, 20, 16, 35727, 21216, 55460, 53237, 18658, 14144, 1456, 13073, 63471, 33594, 3038, 133178, 79012, 3355, 4605, 4605, 13874, 13874, 73594, 3014, 3014, 28149, 17085, 2928, 26610, 7646, 358, 3003, 1012, 364, 83, 813, 566, 594, 1052, 11, 364, 787, 498, 2704, 30, 364, 44, 537, 2704, 358, 3278, 1281, 432, 11, 364, 35, 498, 1075, 1045, 15243, 30, 1205, 6, 42612, 264, 63866, 43]),
]


@pytest.mark.parametrize("text,ids", SPEC_ENCODINGS + LLAMA_CPP_QWEN2_VECTORS)
def test_released_tokenizer_vectors(text, ids):
    tok = builtin()
    assert tok.encode(text) == ids
    assert tok.decode(ids) == text


def test_vectors_also_hold_for_the_exported_folder_in_transformers():
    hf = auto_tokenizer()
    for text, ids in SPEC_ENCODINGS + LLAMA_CPP_QWEN2_VECTORS:
        assert hf(text, add_special_tokens=False)["input_ids"] == ids, text


def test_derived_vocab_and_merges_equal_the_official_files():
    # What we export (derived from the tiktoken ranks) hashes to the official Qwen2 files.
    import json

    folder = exported_dir()
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2"
    assert len(vocab) == 151_643 and len(merges) - 1 == 151_387
    assert qwen.strings_sha256(sorted(vocab, key=vocab.get)) == qwen.OFFICIAL_VOCAB_SHA256
    assert qwen.strings_sha256(merges[1:]) == qwen.OFFICIAL_MERGES_SHA256
    # First merges as listed in qwen25-spec.md §2.2.
    assert merges[1:7] == ["Ġ Ġ", "ĠĠ ĠĠ", "i n", "Ġ t", "ĠĠĠĠ ĠĠĠĠ", "e r"]


def test_control_tokens_match_the_spec_table():
    tok = builtin()
    assert tok.vocab_size == 151_665 and tok.num_regular_tokens == 151_643
    assert [(t.id, t.content, t.special) for t in tok.added_tokens] == SPEC_CONTROL
    assert tok.special_ids == {i for i, _, s in SPEC_CONTROL if s}
    assert tok.control_ids == {i for i, _, _ in SPEC_CONTROL}
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (151645, 151643, None)
    assert tok.stop_token_ids == (151645, 151643)  # generation_config eos_token_id
    for i, text, _ in SPEC_CONTROL:
        assert tok.token_to_id(text) == i and tok.id_to_token(i) == text
        assert tok.encode(text, allow_special=True) == [i]
