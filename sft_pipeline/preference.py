"""Preference pairs (ultrafeedback_binarized's schema): the row checks, the local files, and a synthetic set.

A row is ``prompt`` (a non-empty string), ``chosen`` and ``rejected`` (conversations: lists of ``{role, content}``
messages, as ``chat_data.chat_problem`` checks them, each ending with an assistant turn), optional ``score_chosen``
and ``score_rejected``. Both conversations share their turns before the last reply (the prompt the replies answer)
and ``prompt`` is their first user turn (ultrafeedback's convention). The preference_data stage checks every row
with ``pair_problem`` and drops and counts the bad ones per reason, the way the data stage does for chats; above
``preference_data.max_invalid_share`` it fails naming the first bad rows.

The synthetic set (``preference_data.source: synthetic``) prefers the right answer to a wrong one in the same form.
Half its questions are the synthetic chat set's (``sft_pipeline/synthetic.py``: colours, sounds, repeating,
counting: "The sky is blue." over "The sky is green."; a count off by one; the words in another order), which an SFT
model of that set mostly answers right already; the other half ask the colour of made-up creatures (``CREATURES``:
each has one colour, "The zorblat is purple." over "The zorblat is green."), which no SFT or pretraining data
teaches, so only the preferences can. Both worlds are fixed, so what the train pairs teach holds for the held-out
pairs (the same questions with other wrong answers, as the chat set's test split asks its train split's questions):
held-out reward accuracy rises above 0.5 within a few CPU steps, and the SFT model's preference accuracy (about
half right on the creatures) leaves the DPO model room to beat it. Deterministic for a given seed and size.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import re
from pathlib import Path

from sft_pipeline.chat_data import chat_problem, local_files, normalize_messages, split_files
from sft_pipeline.errors import ConfigError, StageFailure
from sft_pipeline.store import digest, file_sha256

SCHEMA_VERSION = "1"  # bump when pair_problem accepts or rejects other rows: it is part of the stage's key
SYNTHETIC_VERSION = 2  # bump whenever the synthetic rows change: part of the preference data's content fingerprint
# the made-up creatures of the synthetic preference set and their one colour (no model has seen these facts)
CREATURES = {"zorblat": "purple", "quibbet": "green", "flonk": "orange", "trivvle": "white", "mizzard": "red",
             "plonko": "blue", "wexel": "yellow", "drubble": "pink", "yonket": "black", "sprindle": "grey"}
COLUMNS = ("prompt", "chosen", "rejected", "score_chosen", "score_rejected")
SPLITS = ("train_prefs", "test_prefs")  # ultrafeedback_binarized's preference splits (the synthetic set's too)


# --------------------------------------------------------------------------------------------- the row checks
def pair_problem(row: dict) -> str | None:
    """Why a preference row cannot be trained on, or None. One short reason per kind, for the per-reason counts."""
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return "prompt is not a non-empty string"
    for side in ("chosen", "rejected"):
        problem = chat_problem(row.get(side))
        if problem:
            return f"{side}: {problem}"
        if row[side][-1]["role"] != "assistant":
            return f"{side} does not end with an assistant turn"
    chosen, rejected = row["chosen"], row["rejected"]
    if [dict(m) for m in chosen[:-1]] != [dict(m) for m in rejected[:-1]]:
        return "chosen and rejected answer different prompts (their turns before the last reply differ)"
    first_user = next(m["content"] for m in chosen if m["role"] == "user")
    if first_user.strip() != prompt.strip():
        return "prompt is not the conversation's first user turn"
    if chosen[-1]["content"].strip() == rejected[-1]["content"].strip():
        return "chosen and rejected replies are the same"
    sc, sr = row.get("score_chosen"), row.get("score_rejected")
    if _number(sc) and _number(sr) and sc < sr:
        return "score_chosen is below score_rejected (the pair is labelled the wrong way round)"
    return None


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def prompt_turns(row: dict, system_message: str | None = None) -> list[dict]:
    """The conversation both replies answer (the chosen conversation without its last turn), with the SFT format's
    system message put first where it has none (``format.system_message``; None: never), as the SFT rows were."""
    turns = [dict(m) for m in row["chosen"][:-1]]
    if system_message is not None and turns[0]["role"] != "system":
        turns = [{"role": "system", "content": system_message}] + turns
    return turns


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading token ids ``a`` and ``b`` share: where a reply starts after its templated prompt (a
    template can render the prompt alone a little differently, or merge tokens across the border, as trl notes)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# --------------------------------------------------------------------------------------------- the synthetic set
def _wrong(rng: random.Random, question: str, answer: str) -> str:
    """A wrong answer to ``question`` in the form of the right one."""
    from sft_pipeline.synthetic import COLOURS, NUMBERS, SOUNDS

    if question.startswith("What colour is the "):
        obj = question.removeprefix("What colour is the ").rstrip("?")
        colour = {**COLOURS, **CREATURES}[obj]
        other = rng.choice(sorted(set(COLOURS.values()) - {colour}))
        return f"The {obj} is {other}."
    if question.startswith("What does the "):
        animal = question.removeprefix("What does the ").removesuffix(" say?")
        other = rng.choice(sorted(set(SOUNDS.values()) - {SOUNDS[animal]}))
        return f"The {animal} says {other}."
    if question.startswith("Repeat after me: "):
        words = answer.split()
        shuffled = words[:]
        while shuffled == words:
            rng.shuffle(shuffled)
        return " ".join(shuffled)
    n = len(question.removeprefix("How many words are in: ").rstrip("?").split())
    off = n + 1 if n == 1 or rng.random() < 0.5 else n - 1
    return f"There are {NUMBERS[off]} words."


def _question(rng: random.Random) -> tuple[str, str]:
    """A question and its right answer: the chat set's world, or (half the time) a made-up creature's colour."""
    from sft_pipeline.synthetic import _turn

    if rng.random() < 0.5:
        return _turn(rng, pirate=False)
    creature = rng.choice(sorted(CREATURES))
    return f"What colour is the {creature}?", f"The {creature} is {CREATURES[creature]}."


def pairs(n: int, seed: int) -> list[dict]:
    """``n`` preference rows: the right answer (chosen) against a wrong one in the same form (rejected)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        question, answer = _question(rng)
        user = {"role": "user", "content": question}
        rows.append({"prompt": question, "prompt_id": hashlib.sha256(question.encode()).hexdigest(),
                     "chosen": [user, {"role": "assistant", "content": answer}],
                     "rejected": [user, {"role": "assistant", "content": _wrong(rng, question, answer)}],
                     "messages": [user, {"role": "assistant", "content": answer}],
                     "score_chosen": 8.0, "score_rejected": 3.0})
    return rows


def synthetic_splits(train_rows: int, test_rows: int, seed: int = 0) -> dict[str, list[dict]]:
    return {"train_prefs": pairs(train_rows, seed), "test_prefs": pairs(test_rows, seed + 1)}


# --------------------------------------------------------------------------------------------- where the rows come from
def source_fingerprint(pref) -> str:
    """What identifies the preference data's content before reading it (``chat_data.source_fingerprint``'s rules):
    the hub revision's commit, the synthetic generator's version, or the local files' bytes."""
    if pref.source == "hub":
        from sft_pipeline.hub import dataset_commit

        return digest({"hub": pref.dataset, "revision": pref.revision,
                       "commit": dataset_commit(pref.dataset, pref.revision)})
    if pref.source == "synthetic":
        return digest({"synthetic_preferences": SYNTHETIC_VERSION})
    root = Path(pref.dataset).expanduser().resolve()
    base = root if root.is_dir() else root.parent
    files = [f for fs in files_by_split(pref).values() for f in fs]
    return digest({str(Path(p).relative_to(base)): file_sha256(Path(p)) for p in sorted(files)})


def _as_row(raw) -> dict:
    """One row in a shape Arrow can hold whatever it was, keeping ``pair_problem``'s verdict."""
    if not isinstance(raw, dict):
        return {c: None for c in COLUMNS} | {"chosen": [], "rejected": []}
    prompt = raw.get("prompt")
    row = {"prompt": prompt if isinstance(prompt, str) else None,
           "chosen": normalize_messages(raw.get("chosen")), "rejected": normalize_messages(raw.get("rejected"))}
    for k in ("score_chosen", "score_rejected"):
        v = raw.get(k)
        row[k] = float(v) if _number(v) else None
    return row


def _file_rows(path: Path, fmt: str):
    """The rows of one local file, raw (parquet by pyarrow, jsonl or a JSON array by json)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
            names = pf.schema_arrow.names
            missing = [c for c in ("prompt", "chosen", "rejected") if c not in names]
            if missing:
                raise StageFailure(f"preference_data: {path} has no {', '.join(map(repr, missing))} column "
                                   f"(columns: {names})")
            for batch in pf.iter_batches(columns=[c for c in COLUMNS if c in names], batch_size=4096):
                yield from batch.to_pylist()
        except StageFailure:
            raise
        except Exception as e:  # noqa: BLE001 - an undecodable file is bad input: name it, never retry
            raise StageFailure(f"preference_data.dataset: could not read the parquet file {path} "
                               f"({type(e).__name__})") from None
        return
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise StageFailure(f"preference_data.dataset: {path} is not UTF-8 text") from None
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            yield from json.loads(text)
        except ValueError:
            raise StageFailure(f"preference_data.dataset: {path} is not valid JSON") from None
        return
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield json.loads(line)
            except ValueError:
                raise StageFailure(f"preference_data.dataset: {path} line {n} is not valid JSON") from None


def files_by_split(pref) -> dict[str, list[str]]:
    """The local files of each configured split, matched by name as for chats (``chat_data.split_files``); a
    ConfigError names the ``preference_data`` field."""
    try:
        return split_files(pref, local_files(pref))
    except ConfigError as e:  # chat_data names the data section's fields: these are preference_data's
        raise ConfigError(re.sub(r"(?<![\w./-])data\.", "preference_data.", str(e))) from None


def read_local_splits(pref) -> dict[str, list[dict]]:
    """The local files of each configured split as rows, each made storable (``_as_row``)."""
    out = {}
    for split, files in files_by_split(pref).items():
        rows = []
        for f in files:
            fmt = pref.format if pref.format != "auto" else ("parquet" if f.endswith(".parquet") else "json")
            rows.extend(_as_row(r) for r in _file_rows(Path(f), fmt))
        out[split] = rows
    return out


def arrow_rows(rows: list[dict]):
    """Rows as a ``datasets.Dataset`` with one fixed schema (message lists of role/content strings)."""
    import datasets
    import pyarrow as pa

    message = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    schema = pa.schema([("prompt", pa.string()), ("chosen", message), ("rejected", message),
                        ("score_chosen", pa.float64()), ("score_rejected", pa.float64())])
    clean = [{c: r.get(c) for c in COLUMNS} for r in rows]
    return datasets.Dataset(pa.Table.from_pylist(clean, schema=schema))


# --------------------------------------------------------------------------------------------- checks before any stage
def check(cfg) -> None:
    """Raise ConfigError (exit 2, before any stage) when the DPO sections name inputs that are not there: local
    preference files without a file per split, a synthetic split name the set lacks, a bad generation prompt."""
    pref = cfg.preference_data
    if pref.source == "local":
        files_by_split(pref)  # a ConfigError naming preference_data.dataset or the split field
    if pref.source == "synthetic":
        for field in ("train_split", "test_split"):
            if getattr(pref, field) not in SPLITS:
                raise ConfigError(f"invalid config: preference_data.{field}: split {getattr(pref, field)!r} is not "
                                  f"in the synthetic preference set (allowed: {', '.join(SPLITS)})")
    for i, prompt in enumerate(cfg.dpo_generation.prompts):
        problem = chat_problem(prompt, prompt=True)
        if problem:
            raise ConfigError(f"invalid config: dpo_generation.prompts[{i}]: {problem}")
