"""Dump the King James Bible from Debian's `bible-kjv` package, clean it and split it.

Cleaning: the `bible` tool prints a "Book N" heading before each chapter and wraps verses at
80 columns after a right-aligned verse number. We drop headings and verse numbers and unwrap,
so the text is one verse per line and chapters are separated by one blank line.

Split rule (fixed, no randomness): the seven whole books in HELD_OUT_BOOKS (85 KB: narrative,
poetry, prophecy and letters from both testaments) are the validation / held-out text; every
other book is training text. The calibration text for GPTQ is every CALIB_STRIDE-th training
chapter, in order, until it reaches CALIB_BYTES.

Writes (paths relative to the repository root):
  scripts/build_default_model/build/train.txt   training split (4.05 MB, not committed)
  tests/data/kjv/heldout.txt                    held-out split (committed)
  tests/data/kjv/calib.txt                      calibration text from the training split (committed)
"""

import argparse
import re
import subprocess
from pathlib import Path

HELD_OUT_BOOKS = ("Ruth", "Lamentations", "Joel", "Jonah", "Philippians", "James", "1 John")
CALIB_BYTES = 100_000
CALIB_STRIDE = 37  # spreads the calibration chapters over the whole training split

VERSE_START = re.compile(r"^\s+\d+ (.*)$")
HEADING = re.compile(r"^(\S.*) (\d+)$")


def dump_bible() -> str:
    """The whole KJV as the `bible` tool prints it."""
    return subprocess.run(
        ["bible", "gen1:1-rev22:21"], check=True, capture_output=True, text=True
    ).stdout


def parse_chapters(raw: str) -> list[tuple[str, list[str]]]:
    """[(book, [verse, ...]), ...] in canonical order, one entry per chapter."""
    chapters: list[tuple[str, list[str]]] = []
    lines = raw.split("\n")
    for i, line in enumerate(lines):
        heading = HEADING.match(line)
        # A heading stands alone between blank lines; wrapped verse text never does.
        is_heading = (
            heading is not None
            and (i == 0 or lines[i - 1] == "")
            and (i + 1 == len(lines) or lines[i + 1] == "")
        )
        if is_heading:
            chapters.append((heading.group(1), []))
        elif (verse := VERSE_START.match(line)) is not None:
            chapters[-1][1].append(verse.group(1).strip())
        elif line.strip():
            chapters[-1][1][-1] += " " + line.strip()
    return chapters


def join_chapters(chapters: list[tuple[str, list[str]]]) -> str:
    return "\n\n".join("\n".join(verses) for _, verses in chapters) + "\n"


def pick_calibration(train: list[tuple[str, list[str]]]) -> list[tuple[str, list[str]]]:
    picked, size = [], 0
    for chapter in train[::CALIB_STRIDE]:
        picked.append(chapter)
        size += len(join_chapters([chapter]))
        if size >= CALIB_BYTES:
            break
    return picked


def main() -> None:
    root = Path(__file__).resolve().parents[2]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--build-dir", type=Path, default=root / "scripts/build_default_model/build")
    parser.add_argument("--data-dir", type=Path, default=root / "tests/data/kjv")
    args = parser.parse_args()

    chapters = parse_chapters(dump_bible())
    books = {book for book, _ in chapters}
    assert len(books) == 66 and len(chapters) == 1189, (len(books), len(chapters))
    assert set(HELD_OUT_BOOKS) <= books
    train = [c for c in chapters if c[0] not in HELD_OUT_BOOKS]
    heldout = [c for c in chapters if c[0] in HELD_OUT_BOOKS]

    args.build_dir.mkdir(parents=True, exist_ok=True)
    args.data_dir.mkdir(parents=True, exist_ok=True)
    outputs = {
        args.build_dir / "train.txt": train,
        args.data_dir / "heldout.txt": heldout,
        args.data_dir / "calib.txt": pick_calibration(train),
    }
    for path, part in outputs.items():
        path.write_text(join_chapters(part), encoding="utf-8")
        print(f"{path}: {len(part)} chapters, {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
