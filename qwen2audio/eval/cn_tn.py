"""Chinese text normalisation for error rates: a port of speechio's ``cn_tn.py`` (``TextNorm``).

The official Qwen2-Audio evaluation (eval_audio/evaluate_asr.py) scores Chinese with its copy of
https://github.com/speechio/chinese_text_normalization/blob/master/python/cn_tn.py, built as
``TextNorm(to_banjiao=False, to_upper=False, to_lower=False, remove_fillers=False, remove_erhua=False,
check_chars=False, remove_space=False, cc_mode='')``. With every option off, ``TextNorm`` does two things,
and this module ports exactly those: the non-standard words are read out in Chinese characters
(``normalize_nsw``: dates, money, mobile and fixed phone numbers, fractions, percentages, numbers before a
quantifier, digit strings, other numbers, in that order), then every Chinese or ASCII punctuation mark
becomes a space. The rules, their order and their quirks are kept as they are, because scores must equal
the official ones: e.g. each rewrite replaces the *first* occurrence of the matched text, which is not
always where it matched, "1850年" is read as a number of years but "1950年" digit by digit, and full-width
digits are read like ASCII ones.

Original authors: 2019.5 Zhiyang Zhou (https://github.com/Joee1995/chn_text_norm.git),
2019.9 - 2022 Jiayu DU. Licence of the original:

    MIT License

    Copyright (c) 2020 SpeechIO

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

from __future__ import annotations

import re
import string
from typing import NamedTuple

# ---- reading numbers ---------------------------------------------------------------------------------
DIGITS = "零一二三四五六七八九"
LIANG = "两"  # "two" before 百/千/万/亿...: 两千, 一千两百 (but 二十, 十二)
POINT = "点"
TEN = "十"
# Units and their powers of ten. Beyond 万, cn_tn's default "mid" numbering system: each is 万 times the last.
SMALL_UNITS = "十百千万"  # 10^1 .. 10^4
LARGE_UNITS = "亿兆京垓秭穰沟涧正载"  # 10^8, 10^12, ..., 10^44
UNIT_POWERS = tuple(enumerate(SMALL_UNITS, start=1)) + tuple(
    ((i + 2) * 4, unit) for i, unit in enumerate(LARGE_UNITS))


class Symbol(NamedTuple):
    kind: str  # "digit", "unit" or "point"
    value: int  # the digit's value, or the unit's power of ten
    text: str


UNITS = tuple(Symbol("unit", power, unit) for power, unit in UNIT_POWERS)
POINT_SYMBOL = Symbol("point", 0, POINT)


def digit(character: str) -> Symbol:
    # int() reads any Unicode decimal digit (what the rules' \d matches), full-width ones included
    value = int(character)
    return Symbol("digit", value, DIGITS[value])


def spell_integer(digits: str) -> list[Symbol]:
    """Digits -> symbols with units (cn_tn's get_value): "1200" -> 一千二百, "0123" -> 零一百二十三."""
    stripped = digits.lstrip("0")
    if not stripped:
        return []
    if len(stripped) == 1:
        leading_zeros = len(digits) != len(stripped)
        return [digit("0"), digit(stripped)] if leading_zeros else [digit(stripped)]
    unit = next(u for u in reversed(UNITS) if u.value < len(stripped))
    return spell_integer(digits[:-unit.value]) + [unit] + spell_integer(stripped[-unit.value:])


def use_liang(symbols: list[Symbol]) -> list[Symbol]:
    """二 -> 两 before a unit above 十, unless it follows 十 (两千, 一千两百, 两万; but 二十, 十二万)."""
    symbols = list(symbols)
    for i, symbol in enumerate(symbols):
        if symbol.kind != "digit" or symbol.value != 2:
            continue
        following = symbols[i + 1] if i < len(symbols) - 1 else None
        previous = symbols[i - 1] if i > 0 else None
        if following is None or following.kind != "unit" or (previous is not None and previous.kind != "unit"):
            continue
        if following.value != 1 and (previous is None or previous.value != 1):
            symbols[i] = Symbol("digit", 2, LIANG)
    return symbols


def read_number(number: str, units: bool = True, liang: bool = True) -> str:
    """A number string (digits, at most one ".") in Chinese characters (cn_tn's num2chn).

    With units: "1200" -> 一千两百, "10.5" -> 十点五; without: read digit by digit, "2020" -> 二零二零."""
    parts = number.split(".")
    if len(parts) > 2:
        raise ValueError(f"invalid input num string with more than one dot: {number}")
    integer, decimals = parts[0], (parts[1] if len(parts) == 2 else "")
    symbols = spell_integer(integer) if units and len(integer) > 1 else [digit(c) for c in integer]
    if decimals:
        symbols += [POINT_SYMBOL] + [digit(c) for c in decimals]
    if liang:
        symbols = use_liang(symbols)
    text = "".join(s.text for s in symbols)
    if text.startswith(POINT):
        return DIGITS[0] + text
    if len(text) >= 2 and text[0] == DIGITS[1] and text[1] == TEN:  # 一十五 -> 十五
        text = text[1:]
    return text


def read_digits(number: str) -> str:
    """Digit by digit, 二 never 两: codes, years, phone numbers."""
    return read_number(number, units=False, liang=False)


# ---- the non-standard words ----------------------------------------------------------------------------
CURRENCY_UNITS = "((亿|千万|百万|万|千|百)|(亿|千万|百万|万|千|百|)元|(亿|千万|百万|万|千|百|)块|角|毛|分)"
COM_QUANTIFIERS = (
    "(匹|张|座|回|场|尾|条|个|首|阙|阵|网|炮|顶|丘|棵|只|支|袭|辆|挑|担|颗|壳|窠|曲|墙|群|腔|"
    "砣|座|客|贯|扎|捆|刀|令|打|手|罗|坡|山|岭|江|溪|钟|队|单|双|对|出|口|头|脚|板|跳|枝|件|贴|"
    "针|线|管|名|位|身|堂|课|本|页|家|户|层|丝|毫|厘|分|钱|两|斤|担|铢|石|钧|锱|忽|(千|毫|微)克|"
    "毫|厘|分|寸|尺|丈|里|寻|常|铺|程|(千|分|厘|毫|微)米|撮|勺|合|升|斗|石|盘|碗|碟|叠|桶|笼|盆|"
    "盒|杯|钟|斛|锅|簋|篮|盘|桶|罐|瓶|壶|卮|盏|箩|箱|煲|啖|袋|钵|年|月|日|季|刻|时|周|天|秒|分|旬|"
    "纪|岁|世|更|夜|春|夏|秋|冬|代|伏|辈|丸|泡|粒|颗|幢|堆|条|根|支|道|面|片|张|颗|块)"
)
DATE = re.compile(r"\D+((([089]\d|(19|20)\d{2})年)?(\d{1,2}月(\d{1,2}[日号])?)?)")
MONEY = re.compile(r"\D+((\d+(\.\d+)?)[多余几]?" + CURRENCY_UNITS + r"(\d" + CURRENCY_UNITS + r"?)?)")
# China's mobile prefixes (13x, 15x, 18x, 17[678], 19[89]), optionally after +86
MOBILE_PHONE = re.compile(r"\D((\+?86 ?)?1([38]\d|5[0-35-9]|7[678]|9[89])\d{8})\D")
FIXED_PHONE = re.compile(r"\D((0(10|2[1-3]|[3-9]\d{2})-?)?[1-9]\d{6,7})\D")
FRACTION = re.compile(r"(\d+/\d+)")
PERCENTAGE = re.compile(r"(\d+(\.\d+)?%)")
QUANTITY = re.compile(r"(\d+(\.\d+)?)[多余几]?" + COM_QUANTIFIERS)
DIGIT_STRING = re.compile(r"(\d{4,32})")
NUMBER = re.compile(r"(\d+(\.\d+)?)")
LETTERS_TWO_LETTERS = re.compile(r"(([a-zA-Z]+)二([a-zA-Z]+))")  # P2P, B2B, O2O: give their 2 back
TEXT_START, TEXT_END = "^", "$"  # sentinels, so that the rules' \D can match at either end


def read_date(date: str) -> str:
    """"2020年3月5日" -> 二零二零年三月五日: the year digit by digit, month and day as numbers."""
    try:
        year, other = date.strip().split("年", 1)
        year = read_digits(year) + "年"
    except ValueError:
        other, year = date, ""
    month = day = ""
    if other:
        try:
            month, day = other.strip().split("月", 1)
            month = read_number(month) + "月"
        except ValueError:
            day, month = date, ""
        if day:
            day = read_number(day[:-1]) + day[-1]
    return year + month + day


def read_money(money: str) -> str:
    for number, _ in NUMBER.findall(money):
        money = money.replace(number, read_number(number))
    return money


def read_phone(phone: str, fixed: bool) -> str:
    parts = phone.split("-") if fixed else phone.strip("+").split()
    return "".join(read_digits(part) for part in parts)


def read_fraction(fraction: str) -> str:
    numerator, denominator = fraction.split("/")
    return read_number(denominator) + "分之" + read_number(numerator)


def read_percentage(percentage: str) -> str:
    return "百分之" + read_number(percentage.strip().strip("%"))


def _rewrite_first(text: str, matched: str, spoken: str) -> str:
    # cn_tn rewrites the first occurrence of the matched text, wherever the match was
    return text.replace(matched, spoken, 1)


def normalize_nsw(raw_text: str) -> str:
    """Non-standard words (numbers, dates, money, phone numbers, ...) read out, in cn_tn's order."""
    text = TEXT_START + raw_text + TEXT_END
    for match in DATE.findall(text):
        text = _rewrite_first(text, match[0], read_date(match[0]))
    for match in MONEY.findall(text):
        text = _rewrite_first(text, match[0], read_money(match[0]))
    for match in MOBILE_PHONE.findall(text):
        text = _rewrite_first(text, match[0], read_phone(match[0], fixed=False))
    for match in FIXED_PHONE.findall(text):
        text = _rewrite_first(text, match[0], read_phone(match[0], fixed=True))
    for match in FRACTION.findall(text):
        text = _rewrite_first(text, match, read_fraction(match))
    text = text.replace("％", "%")
    for match in PERCENTAGE.findall(text):
        text = _rewrite_first(text, match[0], read_percentage(match[0]))
    for match in QUANTITY.findall(text):
        text = _rewrite_first(text, match[0], read_number(match[0]))
    for match in DIGIT_STRING.findall(text):
        text = _rewrite_first(text, match, read_digits(match))
    for match in NUMBER.findall(text):
        text = _rewrite_first(text, match[0], read_number(match[0]))
    for match in LETTERS_TWO_LETTERS.findall(text):
        text = _rewrite_first(text, match[0], match[1] + "2" + match[2])
    return text.lstrip(TEXT_START).rstrip(TEXT_END)


# ---- punctuation -----------------------------------------------------------------------------------------
# Chinese punctuation as listed by the Zhon project (https://github.com/tsroten/zhon), plus ASCII's.
CN_PUNCS_STOP = "！？｡。"
CN_PUNCS_NONSTOP = (
    "＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃《》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿"
    "–—‘’‛“”„‟…‧﹏·〈〉-"
)
PUNCTUATION = CN_PUNCS_STOP + CN_PUNCS_NONSTOP + string.punctuation
PUNCTUATION_TO_SPACE = str.maketrans(PUNCTUATION, " " * len(PUNCTUATION))


def text_norm(text: str) -> str:
    """cn_tn's TextNorm with every option off, as the official evaluation builds it: numbers read out,
    punctuation replaced by spaces (spaces are kept; case and full-width letters are left alone)."""
    return normalize_nsw(text).translate(PUNCTUATION_TO_SPACE)
