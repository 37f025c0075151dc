"""Prompt sources: txt / jsonl / json / csv / parquet files and inline lists.

Errors name the file (and line or row) so a bad prompt list fails before any work starts.
One rule for every format: prompts are stripped of surrounding spaces, blank entries are
skipped and counted, and a prompt given twice is kept once (counted too); text files are
UTF-8 and split on newlines only (``\n`` or ``\r\n``: not on U+2028, ``\x1c`` or ``\x0b``,
which ``str.splitlines`` would also split on).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from stages.config_loading import Choice, ConfigError


class PromptFormat(Choice):
    """How a prompt file is read; ``auto`` picks the format from the file suffix."""

    auto = "auto"
    txt = "txt"
    jsonl = "jsonl"
    json = "json"
    csv = "csv"
    parquet = "parquet"


@dataclass
class PromptSource:
    """One prompt file. ``txt``: one prompt per line (blank lines and ``#`` comments skipped);
    ``jsonl`` / ``csv`` / ``parquet``: the ``column`` field of each record; ``json``: a list of
    strings or of records with ``column``. ``auto`` picks the format from the file suffix."""

    path: str = "???"
    """File path (relative paths are resolved against the config file's directory) or URI."""
    format: PromptFormat = PromptFormat.auto
    """How the file is read; ``auto``: from its suffix."""
    column: str = "prompt"
    limit: Optional[int] = None
    """Keep only the first ``limit`` prompts of this file."""


@dataclass
class PromptsConfig:
    sources: list[PromptSource] = field(default_factory=list)
    """Prompt files, each ``{path, format, column, limit}`` (see ``PromptSource``); read in order."""
    inline: list[str] = field(default_factory=list)
    """Prompts written in the config itself; they come after the files' prompts."""


def _decode(data: bytes, path: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise ConfigError(
            f"{path}:{line}: not UTF-8 (byte 0x{data[error.start]:02x} at column {column}); "
            "prompt files must be UTF-8: re-save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        ) from None


def _open_text(path: str) -> str:
    """Read a local path or a pyarrow filesystem URI as UTF-8 text."""
    if "://" in path:
        import pyarrow.fs as pafs

        try:
            fs, inner = pafs.FileSystem.from_uri(path)
            with fs.open_input_stream(inner) as stream:
                return _decode(stream.read(), path)
        except (FileNotFoundError, OSError) as error:
            raise ConfigError(f"prompt file not found: {path} ({error})") from None
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"prompt file not found: {path}")
    return _decode(file.read_bytes(), path)


def _lines(text: str) -> list[str]:
    """Lines split on ``\n`` only (a trailing ``\r`` dropped; the newline ending the file ends
    its last line, it does not start an empty one)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _format_of(source: PromptSource) -> str:
    if source.format != PromptFormat.auto:
        return str(source.format)
    suffix = Path(source.path.split("?")[0]).suffix.lower().lstrip(".")
    if suffix in PromptFormat.values() and suffix != PromptFormat.auto:
        return suffix
    raise ConfigError(f"prompt file {source.path}: cannot tell its format from the suffix; set format")


def _checked(prompt: object, where: str) -> str:
    """The prompt stripped of surrounding spaces ('' for a blank entry, which callers skip)."""
    if not isinstance(prompt, str):
        raise ConfigError(f"{where}: prompt must be a string, got {type(prompt).__name__}")
    return prompt.strip()


def _from_record(record: object, column: str, where: str) -> str:
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected an object with a '{column}' field")
    if column not in record:
        raise ConfigError(f"{where}: no '{column}' field (has {sorted(record)})")
    return _checked(record[column], where)


@dataclass
class PromptList:
    """The prompts of a run and what reading them dropped."""

    prompts: list[str]
    blank: int = 0
    """Blank entries skipped (empty or only spaces), over every source."""
    duplicates: int = 0
    """Entries equal to an earlier one after stripping surrounding spaces, kept once."""

    def note(self) -> str | None:
        """One line for the driver when something was dropped, else None."""
        parts = []
        if self.duplicates:
            parts.append(f"{self.duplicates} duplicate{'s' if self.duplicates != 1 else ''} merged (equal after stripping surrounding spaces)")
        if self.blank:
            parts.append(f"{self.blank} blank entr{'ies' if self.blank != 1 else 'y'} skipped")
        return f"prompts: {len(self.prompts)} distinct; " + ", ".join(parts) if parts else None


def _read_source(source: PromptSource) -> tuple[list[tuple[str, str]], int]:
    """((prompt, where) of one file in file order, stripped; blank entries skipped), #blank.
    ``where`` names the file and line (row, item) the prompt came from."""
    kind = _format_of(source)
    entries: list[tuple[str, str]] = []
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        if "://" not in source.path and not Path(source.path).is_file():
            raise ConfigError(f"prompt file not found: {source.path}")
        try:
            table = pq.read_table(source.path)
        except (pa.ArrowException, OSError) as error:
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ConfigError(f"{source.path}: not a readable Parquet file ({first})") from None
        if source.column not in table.column_names:
            raise ConfigError(f"{source.path}: no '{source.column}' column (has {table.column_names})")
        for row, value in enumerate(table.column(source.column).to_pylist()):
            where = f"{source.path} row {row}"
            entries.append(("" if value is None else _checked(value, where), where))
    else:
        text = _open_text(source.path)
        if kind == "txt":
            for line_no, line in enumerate(_lines(text), start=1):
                if not line.lstrip().startswith("#"):
                    entries.append((line.strip(), f"{source.path}:{line_no}"))
        elif kind == "jsonl":
            for line_no, line in enumerate(_lines(text), start=1):
                if not line.strip():
                    continue
                where = f"{source.path}:{line_no}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ConfigError(f"{where}: invalid JSON ({error.msg})") from None
                entries.append((_from_record(record, source.column, where), where))
        elif kind == "json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as error:
                raise ConfigError(f"{source.path}:{error.lineno}: invalid JSON ({error.msg})") from None
            if not isinstance(data, list):
                raise ConfigError(f"{source.path}: expected a JSON list of prompts")
            for index, item in enumerate(data):
                where = f"{source.path} item {index}"
                entries.append((_checked(item, where) if isinstance(item, str) else _from_record(item, source.column, where), where))
        elif kind == "csv":
            reader = csv.DictReader(io.StringIO(text))
            if reader.fieldnames is None or source.column not in reader.fieldnames:
                raise ConfigError(f"{source.path}: no '{source.column}' column (header {reader.fieldnames})")
            for record in reader:
                value, where = record[source.column], f"{source.path}:{reader.line_num}"
                entries.append(("" if value is None else _checked(value, where), where))
        else:  # validate_config already rejected other names
            raise ConfigError(f"prompt file {source.path}: unknown format '{kind}'")
    prompts = [entry for entry in entries if entry[0]]
    if not prompts:
        raise ConfigError(f"{source.path}: the prompt list is empty")
    return (prompts[: source.limit] if source.limit is not None else prompts), len(entries) - len(prompts)


def read_prompt_list(config: PromptsConfig) -> PromptList:
    """All prompts: every source in order, then the inline list; blank entries skipped and
    duplicates kept once, both counted."""
    prompts: list[str] = []
    blank = 0
    for source in config.sources:
        found, skipped = _read_source(source)
        prompts.extend(prompt for prompt, _ in found)
        blank += skipped
    for index, prompt in enumerate(config.inline):
        prompt = _checked(prompt, f"config key 'prompts.inline[{index}]'")
        if prompt:
            prompts.append(prompt)
        else:
            blank += 1
    if not prompts:
        raise ConfigError("config key 'prompts': no prompts (give prompts.sources or prompts.inline)")
    distinct = list(dict.fromkeys(prompts))
    return PromptList(distinct, blank=blank, duplicates=len(prompts) - len(distinct))


def read_prompts(config: PromptsConfig) -> list[str]:
    """All prompts: every source in order, then the inline list. Duplicates are kept once."""
    return read_prompt_list(config).prompts


def read_prompts_with_origin(config: PromptsConfig) -> list[tuple[str, str]]:
    """(prompt, where it first appeared) for every prompt of :func:`read_prompts`, in its order."""
    prompts: list[tuple[str, str]] = []
    for source in config.sources:
        prompts.extend(_read_source(source)[0])
    for index, prompt in enumerate(config.inline):
        where = f"config key 'prompts.inline[{index}]'"
        prompts.append((_checked(prompt, where), where))
    first: dict[str, str] = {}
    for prompt, where in prompts:
        if prompt:
            first.setdefault(prompt, where)
    return list(first.items())
