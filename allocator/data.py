"""Calibration and evaluation text, cut into fixed-length token sequences.

A text source is a local ``.txt`` file (one record per line), a folder of ``.txt`` files, a
``.parquet`` file (its ``text`` column), or a ``datasets`` name written ``NAME[:CONFIG][@SPLIT]``
(``wikitext:wikitext-2-raw-v1@test``, ``allenai/c4@validation``).

Calibration samples random windows from single documents with a seed (the GPTQ/SparseGPT/Wanda
recipe); evaluation joins the records with ``"\\n\\n"`` and cuts consecutive windows (the usual
WikiText-2 perplexity protocol).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from allocator.errors import AllocatorError
from allocator.hub import OFFLINE_HINT, hub_access

_TEXT_COLUMN = "text"


def shared_data_dir() -> Path:
    """The default texts' folder: ``$ALLOCATOR_DATA``, else the copy shipped in the package (``allocator/texts``,
    licences in its SOURCES.md), so an installed wheel runs offline from any folder."""
    env = os.environ.get("ALLOCATOR_DATA")
    return Path(env) if env else Path(__file__).resolve().parent / "texts"


def default_calibration() -> str:
    """The C4 validation sample, as the papers calibrate on C4."""
    return str(shared_data_dir() / "c4" / "validation-2k.parquet")


def default_evaluation() -> str:
    """The WikiText-2 raw test split, as the papers evaluate on it."""
    return str(shared_data_dir() / "wikitext-2-raw" / "test.txt")


DEFAULT_TEXTS = {"c4-validation-2k": default_calibration, "wikitext-2-test": default_evaluation}


def load_records(source: str) -> list[str]:
    """Read the non-empty text records of a file, folder, Parquet file, ``datasets`` name, or one of the
    default texts by name (``c4-validation-2k``, ``wikitext-2-test``: what plans record for them)."""
    if source in DEFAULT_TEXTS:
        source = DEFAULT_TEXTS[source]()
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise AllocatorError(f"text folder {source!r} holds no .txt file: add some or pass a file")
        records = [line for f in files for line in _read_lines(f)]
    elif path.is_file():
        records = _read_parquet(path) if path.suffix == ".parquet" else _read_lines(path)
    elif path.suffix in (".txt", ".parquet") or source.startswith((".", "/", "~")):
        raise AllocatorError(f"data file {source!r} does not exist: pass an existing file, folder or datasets name")
    else:
        records = _read_dataset(source)
    records = [r for r in records if r.strip()]
    if not records:
        raise AllocatorError(f"text source {source!r} is empty: pass a source with some text")
    return records


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise AllocatorError(f"{path} is not UTF-8 text (binary or corrupt?): pass a .txt file or a .parquet") from None
    if "\x00" in text:
        raise AllocatorError(f"{path} holds NUL bytes (a binary file?): pass a .txt file or a .parquet")
    return text.splitlines()


def _read_parquet(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for truncated or non-Parquet files
        raise AllocatorError(f"{path} is not a readable Parquet file ({exc}): re-download it or pass a .txt") from None
    if _TEXT_COLUMN not in table.column_names:
        raise AllocatorError(f"Parquet file {path} has no {_TEXT_COLUMN!r} column (columns: {table.column_names})")
    return [str(t) for t in table.column(_TEXT_COLUMN).to_pylist() if t is not None]


def _read_dataset(spec: str) -> list[str]:
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    try:
        with hub_access() as online:
            import datasets

            ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as exc:  # datasets raises many types for unreachable or unknown names
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise AllocatorError(
            f"cannot load dataset {spec!r} ({first if online else OFFLINE_HINT}): pass a local .txt/.parquet "
            "file or folder, or a datasets name that is reachable"
        ) from exc
    if _TEXT_COLUMN not in ds.column_names:
        raise AllocatorError(f"dataset {spec!r} has no {_TEXT_COLUMN!r} column (columns: {ds.column_names})")
    return list(ds[_TEXT_COLUMN])


def _encode(tokenizer, text: str) -> list[int]:
    # Raw text only: a BOS the tokenizer wants is added per window (bos_token_id), not per document.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def bos_token_id(tokenizer) -> int | None:
    """The BOS id this tokenizer puts before text (Llama-3, Gemma), or None where it adds none (SmolLM2, GPT-2).

    Asked of the tokenizer itself, as the evaluation harnesses do: encode a word with special tokens and
    see whether the BOS token leads.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bos if with_special[:1] == [bos] and plain[:1] != [bos] else None


def check_seq_len(seq_len: int) -> None:
    """A window needs two tokens: one to predict from and one to predict (one besides a BOS)."""
    if seq_len < 2:
        raise AllocatorError(f"--seq-len must be at least 2 tokens (one predicts the next), got {seq_len}")


def _text_len(seq_len: int, bos: int | None) -> int:
    """Text tokens per window: ``seq_len`` less the BOS."""
    check_seq_len(seq_len)
    return seq_len - (bos is not None)


def _window(ids: list[int], bos: int | None) -> torch.Tensor:
    return torch.tensor(ids if bos is None else [bos, *ids], dtype=torch.long)


def evaluation_sequences(
    tokenizer, records: list[str], seq_len: int, n_samples: int | None, bos: int | None = None
) -> torch.Tensor:
    """Consecutive non-overlapping windows of the joined text: ``[n, seq_len]`` (None: all windows).

    With ``bos`` every window is BOS + ``seq_len - 1`` text tokens: BOS counts in the window and is never
    scored (it is no prediction target), so every text token is scored once.
    """
    text_len = _text_len(seq_len, bos)
    ids = _encode(tokenizer, "\n\n".join(records))
    available = len(ids) // text_len
    n = available if n_samples is None else n_samples
    if n < 1 or n > available:
        raise AllocatorError(
            f"evaluation text has {len(ids)} tokens = {available} windows of {seq_len}; "
            f"asked for {n_samples}: ask for at most {available} samples or a shorter --seq-len"
        )
    return torch.stack([_window(ids[i * text_len : (i + 1) * text_len], bos) for i in range(n)])


def calibration_sequences(
    tokenizer, records: list[str], seq_len: int, n_samples: int, seed: int, bos: int | None = None
) -> torch.Tensor:
    """Random windows of ``seq_len`` tokens, each inside one document longer than the window.

    Documents are drawn with a seeded generator, so the same seed gives the same tokens. With ``bos``
    each window is BOS + ``seq_len - 1`` text tokens, as the model saw text in training.
    """
    gen = torch.Generator().manual_seed(seed)
    samples: list[torch.Tensor] = []
    text_len = _text_len(seq_len, bos)
    tries = 0
    while len(samples) < n_samples:
        tries += 1
        if tries > 200 * n_samples + 1000:
            raise AllocatorError(
                f"found only {len(samples)} of {n_samples} calibration documents longer than "
                f"{seq_len} tokens: lower --seq-len or use a source with longer documents"
            )
        doc = records[int(torch.randint(len(records), (1,), generator=gen))]
        ids = _encode(tokenizer, doc)
        if len(ids) <= text_len:
            continue
        start = int(torch.randint(len(ids) - text_len, (1,), generator=gen))
        samples.append(_window(ids[start : start + text_len], bos))
    return torch.stack(samples)


def calibration_split(tokenizer, records: list[str], seq_len: int, calib_samples: int, kl_samples: int, seed: int,
                      bos: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One seeded draw of ``calib_samples + kl_samples`` windows, split: the first calibrate the backend, the last
    measure KL (so a plan's calibration windows depend on its KL windows' count too, as every run draws them)."""
    windows = calibration_sequences(tokenizer, records, seq_len, calib_samples + kl_samples, seed, bos)
    return windows[:calib_samples], windows[calib_samples:]
