"""Whisper's text normalisers, ported from openai/whisper (whisper/normalizers/) for the official scores.

The official Qwen2-Audio evaluation (eval_audio/evaluate_asr.py) imports the copy it ships in
eval_audio/whisper_normalizer/, which is openai/whisper's code. basic.py, english.py and english.json here
are that code with a header added and the spelling table's file closed after reading, nothing else, so that
English and other-language error rates equal the official ones.

Why a port and not the PyPI package whisper-normalizer: from 0.1.2 on that package adds rules of its own
("cause" -> "because", "kinda" -> "kind of", "sorta", "dunno") that the official scores were not computed
with, so its version number is no promise of Whisper's rules; pinning an old release would also clash with
any other user of the package in the same environment.

Licence of the original:

    MIT License

    Copyright (c) 2022 OpenAI

    Permission is hereby granted, free of charge, to any person obtaining a copy
    of this software and associated documentation files (the "Software"), to deal
    in the Software without restriction, including without limitation the rights
    to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
    copies of the Software, and to permit persons to whom the Software is
    furnished to do so, subject to the following conditions:

    The above copyright notice and this permission notice shall be included in all
    copies or substantial portions of the Software.

    THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
    IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
    FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
    AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
    LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
    OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
    SOFTWARE.
"""

from .basic import BasicTextNormalizer as BasicTextNormalizer
from .english import EnglishTextNormalizer as EnglishTextNormalizer
