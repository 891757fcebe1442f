"""Prefill cache: the keys/values of prompts already prefilled, so that a later prompt starting with the same
tokens (a system prompt, few-shot examples, a long document) only prefills the rest.

The keys/values at position i depend only on tokens 0..i, so any stored prompt serves the common prefix it
shares with a new one: a lookup takes the longest common prefix over all entries.
- In memory: an LRU of recent prompts, bounded in bytes.
- On disk (optional): one safetensors file per prompt, named by a hash of (model fingerprint, dtype, tokens),
  whose metadata holds those three and a SHA-256 of the tensors. A file made for another model or dtype is
  refused with an error; an unreadable or corrupt file (malformed metadata, tokens that do not hash to its name,
  tensors that do not match their checksum) is reported, never used, and rewritten after the prefill.
  The directory holds nothing else: one with other files is refused, so a mistyped path never gets written to.
"""
import hashlib
import json
import os
import re
import sys
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from fileio import TEMP_TAG, atomic_write, check_output_dir

FORMAT = "bitfast-prefill-cache-1"
ENTRY = re.compile(r"[0-9a-f]{32}\.safetensors")
ENTRY_TEMP = re.compile(r"\." + ENTRY.pattern + re.escape(TEMP_TAG) + r".*")


def is_cache_dir(folder) -> bool:
    """Whether a folder holds only what a PrefillCache writes: its entries and the temps of their writes."""
    return all(ENTRY.fullmatch(p.name) or ENTRY_TEMP.fullmatch(p.name) for p in Path(folder).iterdir())


def check_cache_dir(directory) -> Path:
    """The cache directory, refused (ValueError) if it is not a new or empty folder or a cache of ours, or cannot
    be written or read."""
    directory = check_output_dir(directory, is_cache_dir, "prefill cache")
    if directory.is_dir() and not os.access(directory, os.R_OK):
        raise ValueError(f"{directory}: prefill cache folder is not readable")
    return directory


def model_fingerprint(model) -> str:
    """Identity of a model's weights: its arguments, and for every tensor its name, shape, dtype and a strided
    sample of its bytes (hashing 4,096 values per tensor tells checkpoints apart without reading them all)."""
    h = hashlib.sha256(json.dumps(model.args.to_dict(), sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // 4096)].contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def _tensors_digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _common_prefix(a: list, b: list) -> int:
    n = min(len(a), len(b))
    mismatch = (torch.tensor(a[:n]) != torch.tensor(b[:n])).nonzero()
    return int(mismatch[0]) if len(mismatch) else n


class PrefillCache:
    def __init__(self, model, directory=None, max_bytes: int = 1 << 30):
        self.fingerprint = model_fingerprint(model)
        self.directory = check_cache_dir(directory) if directory is not None else None
        self.max_bytes = max_bytes
        self.entries = OrderedDict()  # tuple(tokens) -> {"k.i": [1, H, T, D], "v.i": ...}, least recent first
        self.corrupt = set()  # files reported as corrupt (once each); rewritten when their prompt comes again

    @torch.no_grad()
    def prefill(self, model, prompt: torch.Tensor, prefill_fn, **sampling):
        """Prefill `prompt` ([T] tokens) into the model's cache, reusing the longest cached prefix (at most T-1
        tokens: the last one's logits give the first new token). Returns (first token, tokens reused)."""
        tokens = prompt.tolist()
        n, kv = self._lookup(tokens, model)
        n = min(n, len(tokens) - 1)
        for i, layer in enumerate(model.layers if n else []):
            cache = layer.attention.kv_cache
            cache.k_cache[:, :, :n] = kv[f"k.{i}"][:, :, :n]
            cache.v_cache[:, :, :n] = kv[f"v.{i}"][:, :, :n]
        positions = torch.arange(n, len(tokens), device=prompt.device)
        token = prefill_fn(model, prompt[n:].view(1, -1), positions, **sampling)
        return token, n

    def store(self, model, prompt: torch.Tensor):
        """Remember the prompt's keys/values (call after its prefill, before the cache is set up anew)."""
        tokens = tuple(prompt.tolist())
        n = len(tokens)
        kv = {}
        for i, layer in enumerate(model.layers):
            kv[f"k.{i}"] = layer.attention.kv_cache.k_cache[:, :, :n].clone()
            kv[f"v.{i}"] = layer.attention.kv_cache.v_cache[:, :, :n].clone()
        self._remember(tokens, kv)
        path = self._path(tokens, model) if self.directory is not None else None
        if path is not None and (not path.is_file() or path in self.corrupt):
            self._save(path, tokens, kv, model)
            self.corrupt.discard(path)

    # -- memory
    def _remember(self, tokens: tuple, kv: dict):
        self.entries[tokens] = kv
        self.entries.move_to_end(tokens)
        while len(self.entries) > 1 and self._bytes() > self.max_bytes:
            self.entries.popitem(last=False)

    def _bytes(self) -> int:
        return sum(t.numel() * t.element_size() for kv in self.entries.values() for t in kv.values())

    def _lookup(self, tokens: list, model):
        best_n, best = 0, None
        for key in self.entries:
            n = _common_prefix(tokens, list(key))
            if n > best_n:
                best_n, best = n, key
        on_disk = self._disk_candidates(model)
        for path, key in on_disk:
            n = _common_prefix(tokens, key)
            if n > best_n:
                kv = self._load(path, key, model)
                if kv is not None:
                    self._remember(tuple(key), kv)
                    best_n, best = n, tuple(key)
        if best is None:
            return 0, {}
        self.entries.move_to_end(best)
        return best_n, self.entries[best]

    # -- disk
    def _dtype(self, model) -> str:
        return str(model.layers[0].attention.kv_cache.k_cache.dtype).removeprefix("torch.")

    def _path(self, tokens, model) -> Path:
        key = json.dumps([self.fingerprint, self._dtype(model), list(tokens)])
        return self.directory / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"

    def _disk_candidates(self, model) -> list:
        """(path, tokens) of every readable file in the directory; refuses files of another model or dtype."""
        if self.directory is None or not self.directory.is_dir():
            return []
        found = []
        for path in sorted(p for p in self.directory.iterdir() if ENTRY.fullmatch(p.name)):
            if path in self.corrupt:
                continue
            try:
                with safe_open(str(path), framework="pt") as f:
                    meta = f.metadata() or {}
                tokens = json.loads(meta.get("tokens", "null"))
            except (SafetensorError, OSError, ValueError) as e:
                self._report_corrupt(path, e)
                continue
            if meta.get("format") != FORMAT:
                self._report_corrupt(path, "not a prefill cache file")
                continue
            if meta.get("model") != self.fingerprint or meta.get("dtype") != self._dtype(model):
                raise ValueError(
                    f"{path}: prefill cache made for another model or dtype (model {meta.get('model')}, dtype "
                    f"{meta.get('dtype')}; this is model {self.fingerprint}, dtype {self._dtype(model)}): "
                    "use a separate cache directory per model and dtype")
            # The name hashes the tokens it was saved for: edited or malformed tokens would reuse the wrong prefix.
            well_formed = isinstance(tokens, list) and all(type(t) is int for t in tokens)
            if not well_formed or path != self._path(tokens, model):
                self._report_corrupt(path, "its tokens are malformed or not the ones it was saved for")
                continue
            found.append((path, tokens))
        return found

    def _load(self, path: Path, tokens: list, model):
        """The file's tensors, checked against its checksum and the model's cache layout; None if corrupt."""
        cache = model.layers[0].attention.kv_cache.k_cache
        want = {f"{kind}.{i}": (1, layer.attention.n_local_heads, len(tokens), layer.attention.head_dim)
                for kind in "kv" for i, layer in enumerate(model.layers)}  # a pruned model's head counts differ
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                kv = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
            if set(kv) != set(want):
                raise ValueError("wrong tensor names")
            if any(tuple(t.shape) != want[name] or t.dtype != cache.dtype for name, t in kv.items()):
                raise ValueError("wrong tensor shapes or dtypes")
            if _tensors_digest(kv) != meta.get("sha256"):
                raise ValueError("checksum mismatch")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            self._report_corrupt(path, e)
            return None
        return {name: t.to(cache.device) for name, t in kv.items()}

    def _save(self, path: Path, tokens: tuple, kv: dict, model):
        cpu = {name: t.cpu().contiguous() for name, t in kv.items()}
        meta = {"format": FORMAT, "model": self.fingerprint, "dtype": self._dtype(model),
                "tokens": json.dumps(list(tokens)), "sha256": _tensors_digest(cpu)}
        atomic_write(path, save(cpu, metadata=meta))

    def _report_corrupt(self, path: Path, reason):
        self.corrupt.add(path)
        print(f"warning: prefill cache file {path} is corrupt ({reason}); not used, the prefix is recomputed",
              file=sys.stderr)
