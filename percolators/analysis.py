"""The ``standard`` analyzer: Lucene's StandardTokenizer (UAX#29 word boundaries) + lowercase.

Elasticsearch 5+ uses no stop words by default and ``max_token_length`` 255 (longer tokens are
split every 255 characters). This is a regex approximation of the UAX#29 rules Lucene's JFlex
grammar implements:

* letters, digits and underscores (ExtendNumLet) join into one word: ``foo_bar2``;
* a MidLetter (``:`` ``·`` ...) or MidNumLet (``.`` ``'`` U+2019 ...) between two letters joins:
  ``don't``, ``o'reilly's``, ``e.g`` (but ``e.g.`` loses its final dot), ``wi:fi``;
* a MidNum (``,`` ``;`` ...) or MidNumLet between two digits joins: ``3.14``, ``1,000``;
* each CJK ideograph and each Hiragana character is its own token; runs of Thai, Lao, Myanmar,
  Khmer letters are kept as one token (Lucene emits them whole without a dictionary);
* emoji are kept as tokens (Lucene >= 7 emits ``<EMOJI>`` tokens), one per code point plus its
  modifiers/ZWJ sequence;
* everything else (punctuation, symbols, whitespace) separates tokens.

Known approximations: Unicode property tables come from Python's ``str`` classification, not
Lucene's Unicode version; Hebrew-letter quote rules, Katakana specifics and regional-indicator
pairs are simplified; lowercasing is per code point (``Character.toLowerCase``), so ``İ`` becomes
``i`` and a final sigma stays U+03C3, as in Lucene.
"""

from __future__ import annotations

import re
from functools import lru_cache

MAX_TOKEN_LENGTH = 255

_ASCII_TOKEN = re.compile(
    r"[A-Za-z0-9_]+(?:(?:(?<=[A-Za-z])[:.'](?=[A-Za-z])|(?<=[0-9])[.,;'](?=[0-9]))[A-Za-z0-9_]+)*"
)

_IDEO = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f\u3041-\u309f"
_SEA = "\u0e00-\u0e7f\u0e80-\u0eff\u1000-\u109f\u1780-\u17ff\u1950-\u19df\u19e0-\u19ff"
_MARKS = (
    "\u0300-\u036f\u0483-\u0489\u0591-\u05bd\u0610-\u061a\u064b-\u065f\u0900-\u0903\u093a-\u094f"
    "\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f\u200d"
)
_EXTEND_NUM_LET = "_\u203f\u2040\u2054\ufe33\ufe34\ufe4d-\ufe4f\uff3f"
_MID_LETTER = ":\u00b7\u0387\u055f\u05f4\u2027\ufe13\ufe55\uff1a"
_MID_NUM = ",;\u037e\u0589\u060c\u060d\u066c\u07f8\u2044\ufe10\ufe14\ufe50\ufe54\uff0c\uff1b"
_MID_NUM_LET = ".'\u2018\u2019\u2024\ufe52\uff07\uff0e"
_EMOJI = "\u2600-\u27bf\U0001f000-\U0001faff\u2b00-\u2bff\u2300-\u23ff"

# A "word character": a letter or digit (Python's \w minus underscore) that is not an
# ideograph/Hiragana/SE-Asian letter, or a combining mark, or an ExtendNumLet.
_W = rf"(?:(?![{_IDEO}{_SEA}])[^\W_]|[{_MARKS}{_EXTEND_NUM_LET}])"
_LET = rf"(?:(?![{_IDEO}{_SEA}\d])[^\W_]|[{_MARKS}])"
_UNICODE_TOKEN = re.compile(
    rf"{_W}+(?:(?:(?<={_LET})[{_MID_LETTER}{_MID_NUM_LET}](?={_LET})"
    rf"|(?<=\d)[{_MID_NUM}{_MID_NUM_LET}](?=\d)){_W}+)*"
    rf"|[{_IDEO}]"
    rf"|[{_SEA}]+"
    rf"|[{_EMOJI}][\ufe0f\U0001f3fb-\U0001f3ff]*(?:\u200d[{_EMOJI}][\ufe0f\U0001f3fb-\U0001f3ff]*)*"
)


def _lower(token: str) -> str:
    if token.isascii():
        return token.lower()
    out = []
    for ch in token:
        low = ch.lower()
        out.append(low[0] if len(low) != 1 else low)  # Character.toLowerCase is 1:1
    return "".join(out)


def _split_long(tokens: list[str]) -> list[str]:
    out: list[str] = []
    for tok in tokens:
        if len(tok) <= MAX_TOKEN_LENGTH:
            out.append(tok)
        else:
            out.extend(tok[i : i + MAX_TOKEN_LENGTH] for i in range(0, len(tok), MAX_TOKEN_LENGTH))
    return out


@lru_cache(maxsize=65536)
def analyze(text: str) -> tuple[str, ...]:
    """Tokens of ``text`` under the standard analyzer, in order (positions are indexes)."""
    if text.isascii():
        tokens = _ASCII_TOKEN.findall(text.lower())
        if any(len(t) > MAX_TOKEN_LENGTH for t in tokens):
            tokens = _split_long(tokens)
        return tuple(tokens)
    tokens = [_lower(t) for t in _UNICODE_TOKEN.findall(text)]
    return tuple(_split_long(tokens))


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def ascii_lower(value: str) -> str:
    """The folding of ``case_insensitive`` term/prefix/wildcard queries: ASCII letters only.

    Elasticsearch builds those queries with ``AutomatonQueries.toCaseInsensitiveChar``, which adds
    the other case for code points up to 128 only ("For now we only work with ASCII characters");
    every other character must match exactly. So ``ÉCOLE`` does not match ``école``, and comparing
    ``ascii_lower`` of both sides is exactly its test. (Not ``str.lower``/``casefold``: those fold
    non-ASCII letters too.)
    """
    return value.translate(_ASCII_LOWER)

