"""`qwen25 chat MODEL`: an interactive terminal chat with a checkpoint.

The conversation is kept and re-rendered with the chat template every turn; replies stream
as they are generated. Ctrl-C stops the current reply (what was said so far stays in the
history), Ctrl-D or /exit leaves. When the history outgrows the context, the oldest turns
are dropped (the system message stays). Works with a pipe as well as a terminal.

Commands: /reset (forget the conversation), /system TEXT (set the system message and
reset), /exit, /help.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from qwen25.cli.args import add_model_args, add_sampling_args, load_for_generation, sampling_from_args

HELP = "commands: /reset, /system TEXT, /exit (or Ctrl-D), /help; Ctrl-C stops a reply"


def configure(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--system", help="system message (default: the chat template's)")
    add_sampling_args(p)


class Conversation:
    """System message + alternating user/assistant turns, trimmed to fit the context."""

    def __init__(self, system: str | None):
        self.system = system
        self.turns: list[dict] = []

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def fit(self, tokenizer, budget: int) -> int:
        """Drop the oldest exchanges until the prompt has at most `budget` tokens; returns
        how many messages were dropped. The newest user message always stays."""
        from qwen25.assistant import chat_prompt

        dropped = 0
        while len(self.turns) > 1 and len(chat_prompt(tokenizer, self.messages())) > budget:
            cut = 2 if len(self.turns) > 2 else 1
            del self.turns[:cut]
            dropped += cut
        return dropped


def run(args: argparse.Namespace) -> int:
    from qwen25.assistant import chat_prompt, stream_chat

    model, tokenizer, engine = load_for_generation(args)
    sampling = sampling_from_args(args, model)
    max_new = sampling.pop("max_new_tokens")
    conv = Conversation(args.system)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    shown = {k: v for k, v in sampling.items() if k != "seed"}
    dtype = str(model.dtype).removeprefix("torch.")
    print(f"qwen25 chat: {args.model} ({dtype}, decode: {engine.decode_path}); sampling {shown}")
    print(HELP)
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            if interactive:
                print()  # end the prompt line after Ctrl-D
            return 0
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /exit to quit)")
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, rest = text.partition(" ")
            if command in ("/exit", "/quit"):
                return 0
            if command == "/reset":
                conv.turns.clear()
                print("[conversation reset]")
            elif command == "/system":
                conv.system = rest.strip() or None
                conv.turns.clear()
                print(f"[system message {'set' if conv.system else 'cleared'}; conversation reset]")
            elif command == "/help":
                print(HELP)
            else:
                print(f"[unknown command {command}; {HELP}]")
            continue
        conv.turns.append({"role": "user", "content": line})
        budget = engine.max_seq_len - min(max_new, engine.max_seq_len // 4)
        if conv.fit(tokenizer, budget):
            print("[older turns dropped to fit the context]")
        if len(chat_prompt(tokenizer, conv.messages())) >= engine.max_seq_len - 1:
            conv.turns.pop()
            print(f"[that message is too long for the context of {engine.max_seq_len} tokens; "
                  "use a larger --max-seq-len]")
            continue
        reply = _answer(engine, tokenizer, conv.messages(), max_new, sampling | {"stop": args.stop}, stream_chat)
        conv.turns.append({"role": "assistant", "content": reply})


def _answer(engine, tokenizer, messages, max_new, sampling, stream_chat) -> str:
    """Stream one reply; Ctrl-C ends it early. Returns the text shown."""
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    parts: list[str] = []
    pieces = stream_chat(engine, tokenizer, messages, max_new_tokens=max_new, **sampling)
    try:
        for piece in pieces:
            if stop.is_set():
                print(" [stopped]", end="")
                break
            if isinstance(piece, str):
                parts.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
            elif piece.finish_reason == "length":
                print(" [length limit]", end="")
    finally:
        pieces.close()  # cancels the request if it is still running
        signal.signal(signal.SIGINT, previous)
    print()
    return "".join(parts)
