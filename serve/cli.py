"""Chat with a checkpoint in the terminal, streaming the reply as it is generated.

    python -m serve.cli -i sft                  # interactive chat with history; /help lists the commands
    python -m serve.cli -i sft -p "Why is the sky blue?"     # answer once and exit
    python -m serve.cli -i base -p "The capital of France"   # a base model continues raw text

Chat stages (mid, sft, rl) render the conversation in the chat format; a base model is not chat-trained, so its prompt
is BOS + the text and the reply is the continuation (no history).
"""
from __future__ import annotations

import argparse
import sys

from nanojax.common import ArgumentParser, UserError, cli

COMMANDS = """commands:
  /clear            start a new conversation
  /temperature V    sampling temperature (0 = greedy)
  /topk V           sample from the V most likely tokens (0 = all)
  /help             this list
  /quit             leave (also: quit, exit, Ctrl-D)"""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m serve.cli", description=__doc__.split("\n")[0])
    p.add_argument("-i", "--source", default="sft", choices=("base", "mid", "sft", "rl"), help="stage to load")
    p.add_argument("-g", "--model-tag", default=None, help="checkpoint tag, e.g. d20 (default: the largest depth)")
    p.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("-p", "--prompt", default=None, help="answer this once and exit")
    p.add_argument("-t", "--temperature", type=float, default=0.6, help="sampling temperature; 0 is greedy")
    p.add_argument("-k", "--top-k", type=int, default=50, help="sample among the k likeliest tokens; 0 for all")
    p.add_argument("-m", "--max-tokens", type=int, default=256, help="most tokens per answer")
    p.add_argument("--seed", type=int, default=42, help="random seed of the sampling")
    return p


class Session:
    """One conversation: token history (exactly what the model wrote, tool calls included) and sampling settings."""

    def __init__(self, engine, tokenizer, *, chat: bool, temperature: float, top_k: int, max_tokens: int, seed: int):
        self.engine, self.tok, self.chat = engine, tokenizer, chat
        self.temperature, self.top_k, self.max_tokens, self.seed = temperature, top_k, max_tokens, seed
        self.history: list[int] = []
        self.turns = 0

    def clear(self):
        self.history, self.turns = [], 0

    def prompt_ids(self, text: str) -> list[int]:
        if not self.chat:
            return self.tok.encode(text, prepend=self.tok.bos_id)
        turn = self.tok.render_for_completion([{"role": "user", "content": text}])
        return self.history + (turn if not self.history else turn[1:])  # one BOS, at the very start

    def reply(self, text: str, out) -> str:
        """Stream the reply to `out`; for chat, remember both turns."""
        from nanojax.engine import TextStream

        ids = self.prompt_ids(text)
        stops = set(self.engine.default_stops)
        stream, generated, pieces = TextStream(self.tok), [], []
        for tokens, _ in self.engine.generate(ids, max_tokens=self.max_tokens, temperature=self.temperature,
                                              top_k=self.top_k or None, seed=self.seed + self.turns):
            if tokens[0] in stops:
                break
            generated.append(tokens[0])
            if delta := stream.push(tokens[0]):
                pieces.append(delta)
                out.write(delta)
                out.flush()
        if tail := stream.flush():
            pieces.append(tail)
            out.write(tail)
        out.write("\n")
        out.flush()
        if self.chat:
            self.history = ids + generated + [self.tok.encode_special("<|assistant_end|>")]
        self.turns += 1
        return "".join(pieces)

    def command(self, line: str, out) -> bool:
        """Handle a /command; False means quit."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        try:
            if name == "/quit":
                return False
            if name == "/clear":
                self.clear()
                out.write("(new conversation)\n")
            elif name == "/temperature":
                value = float(arg)
                if not value >= 0:
                    raise ValueError
                self.temperature = value
                out.write(f"(temperature {value})\n")
            elif name == "/topk":
                value = int(arg)
                if value < 0:
                    raise ValueError
                self.top_k = value
                out.write(f"(top-k {value or 'off'})\n")
            elif name == "/help":
                out.write(COMMANDS + "\n")
            else:
                out.write(f"(unknown command {name!r})\n{COMMANDS}\n")
        except ValueError:
            out.write(f"(bad value {arg!r} for {name}; see /help)\n")
        out.flush()
        return True


def interactive(session: Session, stdin, out):
    out.write(f"nanojax {'chat' if session.chat else 'completion (base model: no chat history)'}; /help for "
              f"commands\n")
    while True:
        out.write("\nUser: " if session.chat else "\nPrompt: ")
        out.flush()
        line = stdin.readline()
        if not line:  # end of input
            out.write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text in ("quit", "exit"):
            return
        if text.startswith("/"):
            if not session.command(text, out):
                return
            continue
        out.write("\nAssistant: " if session.chat else text)
        out.flush()
        try:
            session.reply(text, out)
        except UserError as e:  # e.g. the conversation outgrew the context: keep the session alive
            out.write(f"\n(error: {e}; /clear starts a new conversation)\n")


@cli
def main(argv=None):
    args = build_parser().parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):  # a model can write anything: never die on a terminal's encoding
        sys.stdout.reconfigure(errors="replace")
    if args.max_tokens < 1:
        raise UserError(f"--max-tokens {args.max_tokens}: must be at least 1")
    if not args.temperature >= 0:
        raise UserError(f"--temperature {args.temperature}: must be >= 0")
    if args.top_k < 0:
        raise UserError(f"--top-k {args.top_k}: must be >= 0 (0 = off)")
    from nanojax import models

    model = models.load(args.source, tag=args.model_tag, step=args.step)
    session = Session(model.engine, model.tokenizer, chat=args.source != "base", temperature=args.temperature,
                      top_k=args.top_k, max_tokens=args.max_tokens, seed=args.seed)
    if args.prompt is not None:
        if not session.chat:
            sys.stdout.write(args.prompt)
        session.reply(args.prompt, sys.stdout)
        return 0
    interactive(session, sys.stdin, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
