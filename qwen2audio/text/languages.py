"""Language codes and the names a transcript's verbose_json gives them.

WHISPER_LANGUAGES is Whisper's table of its 100 languages (openai/whisper, tokenizer.py, MIT licence): the
names OpenAI's transcription API answers with (``"language": "english"``). Qwen2-Audio's language tags
(``<|en|>``, ``<|yue|>``) use the same codes.
"""

from __future__ import annotations

WHISPER_LANGUAGES = {
    "en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ru": "russian", "ko": "korean",
    "fr": "french", "ja": "japanese", "pt": "portuguese", "tr": "turkish", "pl": "polish", "ca": "catalan",
    "nl": "dutch", "ar": "arabic", "sv": "swedish", "it": "italian", "id": "indonesian", "hi": "hindi",
    "fi": "finnish", "vi": "vietnamese", "he": "hebrew", "uk": "ukrainian", "el": "greek", "ms": "malay",
    "cs": "czech", "ro": "romanian", "da": "danish", "hu": "hungarian", "ta": "tamil", "no": "norwegian",
    "th": "thai", "ur": "urdu", "hr": "croatian", "bg": "bulgarian", "lt": "lithuanian", "la": "latin",
    "mi": "maori", "ml": "malayalam", "cy": "welsh", "sk": "slovak", "te": "telugu", "fa": "persian",
    "lv": "latvian", "bn": "bengali", "sr": "serbian", "az": "azerbaijani", "sl": "slovenian", "kn": "kannada",
    "et": "estonian", "mk": "macedonian", "br": "breton", "eu": "basque", "is": "icelandic", "hy": "armenian",
    "ne": "nepali", "mn": "mongolian", "bs": "bosnian", "kk": "kazakh", "sq": "albanian", "sw": "swahili",
    "gl": "galician", "mr": "marathi", "pa": "punjabi", "si": "sinhala", "km": "khmer", "sn": "shona",
    "yo": "yoruba", "so": "somali", "af": "afrikaans", "oc": "occitan", "ka": "georgian", "be": "belarusian",
    "tg": "tajik", "sd": "sindhi", "gu": "gujarati", "am": "amharic", "yi": "yiddish", "lo": "lao", "uz": "uzbek",
    "fo": "faroese", "ht": "haitian creole", "ps": "pashto", "tk": "turkmen", "nn": "nynorsk", "mt": "maltese",
    "sa": "sanskrit", "lb": "luxembourgish", "my": "myanmar", "bo": "tibetan", "tl": "tagalog", "mg": "malagasy",
    "as": "assamese", "tt": "tatar", "haw": "hawaiian", "ln": "lingala", "ha": "hausa", "ba": "bashkir",
    "jw": "javanese", "su": "sundanese", "yue": "cantonese",
}


def language_code(locale: str) -> str:
    """A locale -> its language code: zh-CN -> zh, sv-SE -> sv, en_US -> en, EN -> en."""
    return locale.replace("_", "-").split("-")[0].lower()


def check_language(given, what: str = "language") -> str:
    """A language as a user gives it (en, EN, en-US, zh_CN) -> its code (en, zh), or ValueError saying
    what to give instead: a code not among Whisper's languages would make a prompt tag (``<|english|>``)
    the model never saw."""
    if not isinstance(given, str) or not given.strip():
        raise ValueError(f"{what} must be a language code such as 'en', 'zh' or 'yue', got {given!r}")
    code = language_code(given.strip())
    if code in WHISPER_LANGUAGES:
        return code
    named = [c for c, name in WHISPER_LANGUAGES.items() if name == given.strip().lower()]
    if named:
        raise ValueError(f"{what} {given!r} is a language's name; give its code, {named[0]!r}")
    raise ValueError(f"{what} {given!r} is not a language code of this model's prompts: give an ISO 639-1 code "
                     "such as 'en', 'zh', 'fr' or 'yue' (Cantonese), one of Whisper's 100 languages")


def language_name(code: str) -> str:
    """A language tag -> its name as a transcript's verbose_json gives it (Whisper's, as OpenAI's API
    answers): en and en-US -> english, zh -> chinese, yue -> cantonese; a code Whisper has no name for, as
    given."""
    return WHISPER_LANGUAGES.get(language_code(code), code)
