"""`qwen2audio <command>`: chat with a model about audio, or transcribe audio files.

    qwen2audio chat [MODEL_DIR] --audio FILE [--audio FILE ...] [--prompt TEXT]
    qwen2audio transcribe [MODEL_DIR] FILE [FILE ...]

MODEL_DIR is a Qwen2-Audio checkpoint directory (Hugging Face layout); left out, the embedded default
model is used (tiny and random: it shows the pipeline works, its words mean nothing).
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
import warnings
from pathlib import Path
from typing import Sequence

from .audio import AudioError
from .checkpoint import CheckpointError

EXIT_USAGE = 2
# Modules that add commands: each has register(subparsers), which adds its parser(s) with
# set_defaults(handler=function(args) -> exit code). Their heavy imports belong inside the handler.
COMMAND_MODULES: list[str] = ["qwen2audio.checkpoint.init", "qwen2audio.training.cli", "qwen2audio.eval.cli"]
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # all C0 controls but \t and \n, and DEL


def _model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", nargs="?", default=None, metavar="MODEL_DIR",
                        help="checkpoint directory; omitted: the embedded default model")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="weights dtype (auto: as stored in the files)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")


def _sampling_args(parser: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="most tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen2audio", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="talk to the model about audio (voice chat or audio analysis)")
    _model_arg(chat)
    chat.add_argument("--audio", action="append", default=[], metavar="FILE",
                      help="audio file for the first turn (repeatable)")
    chat.add_argument("--prompt", default=None,
                      help="text of the first turn; without it the audio alone is the turn (voice chat)")
    chat.add_argument("--system", default=None, help="system prompt (default: the official one)")
    chat.add_argument("--json", action="store_true",
                      help='print one JSON object {"text": ..., "token_ids": [...]} instead of streaming')
    chat.add_argument("--interactive", action=argparse.BooleanOptionalAction, default=None,
                      help="keep the conversation going after the first answer (default: when stdin is a terminal)")
    _sampling_args(chat)

    tr = sub.add_parser("transcribe", help="print plain transcripts of audio files")
    _model_arg(tr)
    tr.add_argument("files", nargs="+", metavar="FILE")
    tr.add_argument("--language", default="en", help="language tag of the speech (e.g. en, zh, fr)")
    tr.add_argument("--json", action="store_true", help="one JSON line per file")
    _sampling_args(tr)

    for module in COMMAND_MODULES:  # further commands live beside the code they run
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "handler", None) is not None:  # a command registered by COMMAND_MODULES
        try:
            return int(args.handler(args) or 0)
        except (AudioError, CheckpointError, FileNotFoundError, ValueError) as err:
            print(f"qwen2audio: error: {err}", file=sys.stderr)
            return EXIT_USAGE
    # `qwen2audio transcribe FILE` without MODEL_DIR: argparse gives the first file to model_dir.
    if args.command == "transcribe" and args.model_dir and Path(args.model_dir).is_file():
        args.files.insert(0, args.model_dir)
        args.model_dir = None
    try:
        if args.model_dir is not None and not Path(args.model_dir).is_dir():
            raise FileNotFoundError(f"checkpoint directory {args.model_dir} does not exist (nor is it an audio file); "
                                    "give the directory that holds config.json, or leave it out for the default model")
        model = _load(args)
        sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                        stop=tuple(args.stop))
        if args.command == "chat":
            return _chat(model, args, sampling)
        return _transcribe(model, args, sampling)
    except (AudioError, CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"qwen2audio: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def _load(args):
    from .api import Qwen2Audio
    from .default_model import NOTICE

    if args.model_dir is None:
        print(f"qwen2audio: {NOTICE}", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Qwen2Audio.load(args.model_dir, dtype=args.dtype, device=args.device)


def _chat(model, args, sampling) -> int:
    if not args.audio and not args.prompt:
        raise ValueError("give the first turn: --audio FILE (voice chat), --prompt TEXT, or both")
    conv = model.conversation(system=args.system)
    deltas = conv.stream(args.prompt, audio=list(args.audio), **sampling)
    if args.json:
        text = "".join(deltas)
        print(json.dumps({"text": text, "token_ids": conv.last.token_ids}, ensure_ascii=False))
        return 0
    _print_stream(deltas)
    interactive = sys.stdin.isatty() if args.interactive is None else args.interactive
    while interactive:
        turn = _read_turn()
        if turn is None:
            break
        text, audios = turn
        if text or audios:
            _print_stream(conv.stream(text or None, audio=audios, **sampling))
    return 0


def _print_stream(deltas) -> None:
    tty = sys.stdout.isatty()
    for delta in deltas:
        if tty:  # a model's stray escape sequence must not take over the user's terminal
            delta = CONTROL_CHARS.sub(lambda m: f"\\x{ord(m.group()):02x}", delta)
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()


def _read_turn() -> tuple[str, list[str]] | None:
    """One user turn from stdin: text, with `/audio PATH` lines attaching audio. None at end of input."""
    if sys.stdin.isatty():
        sys.stderr.write("you> ")
        sys.stderr.flush()
    line = sys.stdin.readline()
    if not line:
        return None
    line = line.strip()
    if line.startswith("/audio "):
        path, _, text = line[len("/audio "):].strip().partition(" ")
        return text.strip(), [path]
    return line, []


def _transcribe(model, args, sampling) -> int:
    failed = 0
    for path in args.files:
        try:
            text = model.transcribe(path, language=args.language, **sampling)
        except AudioError as err:  # one bad file does not stop the others
            print(f"qwen2audio: error: {err}", file=sys.stderr)
            failed += 1
            continue
        if args.json:
            print(json.dumps({"file": path, "text": text}, ensure_ascii=False))
        elif len(args.files) > 1:
            print(f"{path}\t{text}")
        else:
            print(text)
    return EXIT_USAGE if failed else 0


if __name__ == "__main__":
    sys.exit(main())
