"""Reading a CSV of image rows so that every way it can be malformed ends in one line naming the
file and the line (1-based, as an editor shows it), never in a bare `_csv.Error`.

The csv module alone crashes on a field over its size limit without saying where, and a
`UnicodeDecodeError` names neither file nor line. Worse, an unbalanced quote parses silently:
the quoted field runs on over every later line, so the rest of the file becomes one row. An
image CSV's fields (paths, labels, numbers, pixels) never hold a line break, so a field that
does is refused, naming the line where its quote opened.
"""

from __future__ import annotations

import csv

from ssfer_jax.errors import DatasetError

# No line of an image CSV comes near this (FER2013's pixel rows are ~9,000 characters); a
# longer one is not read whole (a binary file named as a CSV may hold no line break at all).
MAX_LINE = 1 << 24


def read_rows(path: str, encoding: str = "utf-8-sig") -> list[tuple[int, list[str]]]:
  """(the line a row starts on, its fields) for every row of `path`, header included; blank
  lines give empty rows, as `csv.reader` does. DatasetError names the file and line of a
  field over the csv module's limit, a line over MAX_LINE, bytes that are not UTF-8, and a
  quoted field holding a line break (an unbalanced quote)."""
  out = []
  with open(path, newline="", encoding=encoding) as f:
    reader = csv.reader(_lines(f, path))
    start = 1
    try:
      for row in reader:
        _check_line_breaks(path, start, reader.line_num, row, out[0][1] if out else [])
        out.append((start, row))
        start = reader.line_num + 1
    except csv.Error as e:
      where = f"line {start}"
      if reader.line_num > start:
        where = (f"the row that starts on line {start} and runs to line {reader.line_num} (an "
                 f"unbalanced quote on line {start}?)")
      fix = ("an image CSV's fields are short: is this the right file?"
             if "field limit" in str(e) else "fix the CSV there.")
      raise DatasetError(f"{path}, {where}: {e}; {fix}") from None
    except UnicodeDecodeError:
      line, column, byte = _first_bad_bytes(path, encoding)
      raise DatasetError(f"{path}, line {line}: not UTF-8 (byte {byte:#04x} at byte column "
                         f"{column}); save the CSV as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
                         ) from None
  return out


def _lines(f, path: str):
  """The file's lines, refusing one longer than MAX_LINE before reading the rest of it."""
  n = 0
  while line := f.readline(MAX_LINE):
    n += 1
    if len(line) == MAX_LINE and not line.endswith(("\n", "\r")):
      raise DatasetError(f"{path}, line {n}: longer than {MAX_LINE} characters; an image CSV's "
                         "lines are short: is this the right file?")
    yield line


def _check_line_breaks(path: str, start: int, end: int, row: list[str],
                       header: list[str]) -> None:
  """Refuses a row with a field holding a line break: its quote opened on the row's first line
  (the fields before it hold none)."""
  for k, field in enumerate(row):
    if "\n" in field or "\r" in field:
      name = f"field {k + 1}" + (f" ({header[k]!r})" if k < len(header) else "")
      runs = f"runs over lines {start} to {end}" if end > start else "is not closed on that line"
      raise DatasetError(
          f"{path}, line {start}: the quote opening {name} {runs} (an unbalanced quote merges "
          "every later row into one); close or remove it (an image CSV's fields hold no line "
          "breaks).")


def _first_bad_bytes(path: str, encoding: str) -> tuple[int, int, int]:
  """(line, 1-based byte column, byte) of the first bytes of `path` that do not decode. A line
  break is never inside a multi-byte UTF-8 sequence, so decoding line by line finds them."""
  with open(path, "rb") as f:
    for n, raw in enumerate(iter(lambda: f.readline(MAX_LINE), b""), 1):
      try:
        raw.decode(encoding if n == 1 else encoding.replace("-sig", ""))
      except UnicodeDecodeError as e:
        return n, e.start + 1, raw[e.start]
  return 0, 0, 0
