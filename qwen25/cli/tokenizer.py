"""`qwen25 tokenizer encode|decode|train|export`: the tokenizer from the command line.

    qwen25 tokenizer encode "Hello world"            -> 9707 1879
    echo "Hello" | qwen25 tokenizer encode           (text from stdin)
    qwen25 tokenizer decode 9707 1879                -> Hello world
    qwen25 tokenizer train --vocab-size 32000 a.txt b.txt --out my_tok
    qwen25 tokenizer export out_dir                  (the built-in vocabulary as an HF folder)

`--tokenizer` picks the vocabulary: "qwen2.5" (built in, the default) or an HF folder.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from qwen25.errors import UserError


def configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    def with_tokenizer(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--tokenizer", default="qwen2.5",
                        help="'qwen2.5' (built in) or an HF tokenizer folder (default: qwen2.5)")
        return sp

    enc = with_tokenizer(sub.add_parser("encode", help="text -> token ids"))
    enc.add_argument("text", nargs="?", help="text to encode (default: read stdin)")
    enc.add_argument("--allow-special", action="store_true",
                     help="turn control-token text such as <|im_end|> into control ids")
    enc.add_argument("--json", action="store_true", help="print a JSON list")

    dec = with_tokenizer(sub.add_parser("decode", help="token ids -> text"))
    dec.add_argument("ids", nargs="*", help="ids (default: read stdin; spaces, commas or JSON)")
    dec.add_argument("--skip-special-tokens", action="store_true",
                     help="drop special control tokens such as <|im_end|>")

    tr = sub.add_parser("train", help="learn a new byte-level BPE vocabulary from text files")
    tr.add_argument("files", nargs="+", help="UTF-8 text files")
    tr.add_argument("--vocab-size", type=int, required=True,
                    help="total ids, including 256 bytes and the 22 control tokens")
    tr.add_argument("--out", required=True, help="output folder (HF tokenizer files)")
    tr.add_argument("--min-frequency", type=int, default=2,
                    help="keep merges seen at least this often (default: 2)")

    ex = with_tokenizer(sub.add_parser("export", help="write a tokenizer as an HF folder"))
    ex.add_argument("out", help="output folder")


def _stdin_text() -> str:
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"stdin is not valid UTF-8 (byte {e.start}); convert it to UTF-8 first") from None


def _parse_ids(words: list[str]) -> list[int]:
    text = " ".join(words) if words else _stdin_text()
    text = text.strip()
    if text.startswith("["):
        try:
            ids = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"ids are not a JSON list: {e}") from None
    else:
        ids = [w for w in re.split(r"[\s,]+", text) if w]
    try:
        return [int(i) for i in ids]
    except (TypeError, ValueError):
        raise UserError("ids must be integers separated by spaces or commas, or a JSON list") from None


def run(args: argparse.Namespace) -> int:
    from qwen25.tokenizer import load_tokenizer

    if args.action == "train":
        from qwen25.tokenizer.train import train_tokenizer

        tok = train_tokenizer(args.files, args.vocab_size, args.out, min_frequency=args.min_frequency)
        print(f"wrote {args.out}: {tok.vocab_size} ids ({tok.num_regular_tokens} regular "
              f"+ {len(tok.added_tokens)} control)")
        return 0
    tok = load_tokenizer(args.tokenizer)
    if args.action == "encode":
        text = args.text if args.text is not None else _stdin_text()
        ids = tok.encode(text, allow_special=args.allow_special)
        print(json.dumps(ids) if args.json else " ".join(map(str, ids)))
    elif args.action == "decode":
        sys.stdout.write(tok.decode(_parse_ids(args.ids), skip_special_tokens=args.skip_special_tokens))
        sys.stdout.write("\n")
    elif args.action == "export":
        for f in tok.save_pretrained(args.out):
            print(f)
    return 0
