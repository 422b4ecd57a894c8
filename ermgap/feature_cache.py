"""The encoder-output cache: with a frozen audio encoder, its output is computed once per utterance.

When LoRA adapts only the language model (`lora.train_audio_encoder=false`, the paper's setting),
what the language model receives for an utterance — the audio encoder + projector output at the
clip's valid positions, [n_audio_tokens, d_text] — is a pure function of the audio file, the
feature-extractor and crop settings and the frozen weights. Qwen2-Audio's Whisper encoder always runs
on a full 30 s window, so recomputing it every step and every evaluation of every trial is most of
an evaluation forward. Here it is computed once and stored; batches then carry `audio_embeds`
instead of log-mels (`ermgap.batching.EmotionCollator`) and `ermgap.scoring.model_inputs` scatters
them into the text embeddings exactly where the model would have put its own encoder output.

Entries: `<dir>/<key[:2]>/<key>.safetensors`, one tensor `audio_embeds` plus its SHA-256 in the
metadata. Key = BLAKE2b(encoder fingerprint, SHA-256 of the audio file's bytes), where the
fingerprint hashes the frozen encoder + projector tensors (names, dtypes, bytes), the feature
extractor's settings and the crop (sample rate, `data.max_audio_s`): any change gives a different
key, never a stale entry. Writes go to a temp file beside the entry and are renamed onto it, so
concurrent writers (trials of a sweep, ranks of a run) cannot leave a torn file; a truncated or
corrupt entry fails to parse or fails its checksum, is reported with a warning and recomputed.
The directory may also be an s3:// / gs:// prefix (ermgap.storage: each entry is one object, written
by one PUT), which every node of a cluster shares.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path

import pandas as pd
import ray
import torch
from ray.util import ActorPool
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from ermgap.batching import compute_features
from ermgap.config import config_from_dict
from ermgap.data.dataset import UtteranceDataset
from ermgap.errors import ConfigError
from ermgap.io import atomic_write_bytes
from ermgap.scoring import causal_lm
from ermgap.storage import Location, is_uri

OFF = "off"
FORMAT = 1  # bump when the entry layout or what is encoded changes: old entries then get other keys
TENSOR = "audio_embeds"


def cache_dir(cfg) -> Path | Location | None:
    """Where a run's cache lives (a RunConfig): a directory, an object-store prefix, or None when it is off.

    Off when the audio encoder is trained (its output changes every step) or `data.feature_cache: off`.
    Default: `<tracking.storage_path>/feature_cache`, which every trial of a sweep shares.
    Drivers ask this (ermgap.driver), so the module leaves transformers and the model stack to the functions
    that run a model: a driver, a sweep's trial driver and Ray Train's controller never load them.
    """
    if cfg.lora.train_audio_encoder or cfg.data.feature_cache == OFF:
        return None
    where = cfg.data.feature_cache or f"{cfg.tracking.storage_path.rstrip('/')}/feature_cache"
    return Location.of(where) if is_uri(where) else Path(where).expanduser()


def why_uncached(cfg) -> str | None:
    """Why a RunConfig's run has no cache (cache_dir is None), in words; None when it has one."""
    if cfg.lora.train_audio_encoder:
        return ("lora.train_audio_encoder is true: the audio encoder is trained, so its output changes every step "
                "and is never cached")
    if cfg.data.feature_cache == OFF:
        return "data.feature_cache is off in this config (unset it, or set it to a directory, to use a cache)"
    return None


def supports(model) -> bool:
    """Whether the model has Qwen2-Audio's layout (an audio tower and projector feeding the LM), which
    `encode` reproduces; other speech LLMs (Voxtral) run uncached."""
    inner = getattr(causal_lm(model), "model", None)
    return hasattr(inner, "audio_tower") and hasattr(inner, "multi_modal_projector")


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().reshape(-1).contiguous().cpu()
    return memoryview(flat.view(torch.uint8).numpy())


def encoder_fingerprint(model, feature_extractor, *, sample_rate: int, max_audio_s: float | None) -> str:
    """Hash of everything the cached features depend on besides the audio: frozen weights and settings.

    `model`: Qwen2-Audio or any wrapper (peft, DeepSpeed); LoRA layers in the audio tower would change
    its state dict, hence the key.
    """
    m = causal_lm(model).model
    h = hashlib.blake2b(digest_size=20)
    settings = {"format": FORMAT, "feature_extractor": feature_extractor.to_dict(), "sample_rate": sample_rate,
                "max_audio_s": max_audio_s}
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, t in chain(m.audio_tower.state_dict(prefix="audio_tower.").items(),
                         m.multi_modal_projector.state_dict(prefix="projector.").items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


@torch.no_grad()
def encode(model, input_features: torch.Tensor, feature_attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """Audio encoder + projector at each clip's valid positions → [n_i, d_text] per clip.

    The same computation as Qwen2AudioModel.forward's audio branch (the padded window goes through the
    encoder with the padding masked out; the output is cut to the clip's audio-token count).
    """
    from transformers.masking_utils import create_bidirectional_mask  # only where a model runs: see cache_dir

    m = causal_lm(model).model
    tower = m.audio_tower
    feats = input_features.to(tower.device, tower.dtype)
    fmask = feature_attention_mask.to(tower.device)
    feat_len, out_len = tower._get_feat_extract_output_lengths(fmask.sum(-1))
    n, _, frames = feats.shape
    width = (frames - 2) // 2 + 1
    valid = (torch.arange(width, device=feat_len.device)[None, :] < feat_len[:, None]).long()
    mask = create_bidirectional_mask(config=tower.config, inputs_embeds=torch.zeros(n, width, 1, dtype=feats.dtype,
                                                                                    device=feats.device),
                                     attention_mask=valid)
    projected = m.multi_modal_projector(tower(feats, attention_mask=mask).last_hidden_state)
    return [projected[i, : int(out_len[i])] for i in range(n)]


@dataclass
class CacheStats:
    """What a run's cache did: `hits` reads served from the cache (a fill finding an entry, and every training
    or evaluation read of one: a 10-epoch run reads each entry 10 times), `misses` encoder computations,
    encoder seconds, corrupt entries replaced. Reads in DataLoader worker processes are not counted."""

    hits: int = 0
    misses: int = 0
    encoder_s: float = 0.0
    corrupt: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def total(cls, parts: Sequence[CacheStats]) -> CacheStats:
        return cls(*(sum(getattr(p, f) for p in parts) for f in ("hits", "misses", "encoder_s", "corrupt")))


class FeatureCache:
    """Entries of one encoder fingerprint in a directory (see the module docstring for the layout)."""

    def __init__(self, directory: str | os.PathLike | Location, fingerprint: str) -> None:
        self.dir = Location.of(directory) if isinstance(directory, Location) or is_uri(directory) else Path(directory)
        self.fingerprint = fingerprint
        self.stats = CacheStats()

    def key(self, audio_digest: str) -> str:
        return hashlib.blake2b(f"{self.fingerprint}:{audio_digest}".encode(), digest_size=20).hexdigest()

    def path(self, key: str) -> Path | Location:
        return self.dir / key[:2] / f"{key}.safetensors"

    def load(self, key: str) -> torch.Tensor | None:
        """The entry's tensor, or None if absent or unreadable (a warning names a corrupt entry)."""
        path = self.path(key)
        if not path.is_file():
            return None
        why = None
        try:
            with _local_copy(path) as local, safe_open(local, "pt") as fh:
                stored = (fh.metadata() or {}).get("sha256")
                tensor = fh.get_tensor(TENSOR).clone()  # own memory, not a view of the file's mapping
            if stored != hashlib.sha256(_tensor_bytes(tensor)).hexdigest():
                why = "checksum mismatch"
        except (SafetensorError, OSError, ValueError) as err:
            why = f"unreadable ({type(err).__name__}: {err})"
        if why is not None:
            self.stats.corrupt += 1
            warnings.warn(f"feature cache: {path} is corrupt ({why}); recomputing it", stacklevel=2)
            return None
        return tensor

    def store(self, key: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().contiguous().cpu()
        data = st_save({TENSOR: tensor}, metadata={"sha256": hashlib.sha256(_tensor_bytes(tensor)).hexdigest(),
                                                   "format": str(FORMAT)})
        path = self.path(key)
        if isinstance(path, Location):
            path.write_bytes(data, force=True)  # one PUT: readers see the whole object or none
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data, force=True)  # temp file + rename: readers never see a torn entry


@contextlib.contextmanager
def _local_copy(path: Path | Location) -> Iterator[Path]:
    """A local file with the entry's bytes: the file itself, or (object store) a downloaded copy, since
    safetensors opens files by name."""
    if isinstance(path, Path):
        yield path
        return
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as tmp:
        tmp.write(path.read_bytes())
        tmp.flush()
        yield Path(tmp.name)


class EncodedDataset(torch.utils.data.Dataset):
    """UtteranceDataset items whose audio is replaced by the cached `audio_embeds` [n_audio, d_text].

    `fill` computes and stores the missing entries of the given indices (in batches through the
    encoder); `__getitem__` reads an entry from disk (so a 7B-width corpus need not fit in memory)
    and recomputes it if it has become unreadable.
    """

    def __init__(self, base, cache: FeatureCache, model, processor, *, batch_size: int = 8,
                 device: str | torch.device = "cpu") -> None:
        self.base, self.cache, self.model, self.processor = base, cache, model, processor
        self.batch_size, self.device = batch_size, device
        self.keys = [cache.key(file_digest(p)) for p in base.df["audio_path"]]

    def __len__(self) -> int:
        return len(self.base)

    def fill(self, indices: Sequence[int] | None = None, *, on_done: Callable[[int], None] | None = None) -> None:
        """Ensure every entry of `indices` (default: all) is in the cache; counts hits and misses.

        Trials that start together (a sweep's first wave) fill one cache at once. Each process visits the
        entries batch by batch in an order of its own (random) and looks them up shortly before encoding, so
        concurrent fillers mostly take up each other's entries instead of all encoding everything. Misses are
        gathered into full batches before they are encoded (a mostly filled cache is not topped up one entry
        at a time)."""
        order = list(range(len(self)) if indices is None else indices)
        batches = [order[k:k + self.batch_size] for k in range(0, len(order), self.batch_size)]
        random.Random().shuffle(batches)
        pending: list[int] = []
        for batch in batches:
            for i in batch:
                if self.cache.load(self.keys[i]) is None:
                    pending.append(i)
                else:
                    self.cache.stats.hits += 1
                    if on_done:
                        on_done(1)
            if len(pending) >= self.batch_size:
                self._encode_done(pending[:self.batch_size], on_done)
                pending = pending[self.batch_size:]
        if pending:
            self._encode_done(pending, on_done)

    def _encode_done(self, indices: list[int], on_done: Callable[[int], None] | None) -> None:
        self._compute(indices)
        if on_done:
            on_done(len(indices))

    def _compute(self, indices: Sequence[int]) -> list[torch.Tensor]:
        items = [self.base[i] for i in indices]
        t0 = time.perf_counter()
        feats, fmask = compute_features(self.processor.feature_extractor, [it["audio"] for it in items],
                                        self.base.sample_rate)
        embeds = encode(self.model, feats.to(self.device), fmask.to(self.device))
        self.cache.stats.encoder_s += time.perf_counter() - t0
        self.cache.stats.misses += len(indices)
        for i, e in zip(indices, embeds):
            self.cache.store(self.keys[i], e)
        return [e.cpu() for e in embeds]

    def __getitem__(self, i: int) -> dict:
        embeds = self.cache.load(self.keys[i])
        if embeds is None:
            embeds = self._compute([i])[0]
        else:
            self.cache.stats.hits += 1
        return {**self.base.fields(i), "audio_embeds": embeds}


# ----------------------------------------------------------------------------- filling ahead of a sweep


class _Encoder:
    """A Ray actor holding the backbone once and filling the cache for chunks of manifest rows."""

    def __init__(self, cfg_tree: dict, directory: str | Location, device: str, threads: int) -> None:
        from ermgap.model import load_backbone  # see cache_dir

        torch.set_num_threads(threads)
        self.cfg = config_from_dict(cfg_tree, source="features build")
        self.device = device
        self.model, self.processor = load_backbone(self.cfg.model, device=device)
        fingerprint = encoder_fingerprint(self.model, self.processor.feature_extractor,
                                          sample_rate=self.cfg.data.sample_rate, max_audio_s=self.cfg.data.max_audio_s)
        self.cache = FeatureCache(directory, fingerprint)

    def fill(self, records: list[dict]) -> dict:
        before = CacheStats(**self.cache.stats.to_dict())
        base = UtteranceDataset(pd.DataFrame(records), sample_rate=self.cfg.data.sample_rate,
                                max_audio_s=self.cfg.data.max_audio_s)
        EncodedDataset(base, self.cache, self.model, self.processor, batch_size=self.cfg.eval.batch_size,
                       device=self.device).fill()
        now = self.cache.stats
        return {f: getattr(now, f) - getattr(before, f) for f in ("hits", "misses", "encoder_s", "corrupt")}


def fill_cache(cfg, rows: pd.DataFrame, *, workers: int | None = None, chunk: int = 32,
               progress: bool = True) -> tuple[Path | Location, CacheStats]:
    """Encode every utterance of `rows` (the run's manifest rows, all splits) into its cache with Ray actors.

    `cfg`: a resolved RunConfig (absolute paths: actors start elsewhere); Ray must be initialised.
    Each actor loads the backbone on the device the run trains on (the dtype is part of the key).
    Returns the cache directory and the summed stats.
    """
    directory = cache_dir(cfg)
    if directory is None:
        raise ConfigError(f"nothing to build: {why_uncached(cfg)}")
    records = rows.to_dict("records")
    d = cfg.distributed
    n_actors = max(1, min(workers or d.num_workers, -(-len(records) // chunk)))
    actor = ray.remote(num_cpus=d.cpus_per_worker, num_gpus=1 if d.use_gpu else 0)(_Encoder)
    device = "cuda" if d.use_gpu else "cpu"
    # A Location travels as itself: its S3 endpoint reaches actors on nodes without $AWS_ENDPOINT_URL.
    where = directory if isinstance(directory, Location) else str(directory.resolve())
    actors = [actor.remote(cfg.to_dict(), where, device, max(1, int(d.cpus_per_worker)))
              for _ in range(n_actors)]
    pool = ActorPool(actors)
    chunks = [records[i:i + chunk] for i in range(0, len(records), chunk)]
    total = CacheStats()
    columns = (TextColumn("[bold]features[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn())
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task(str(directory), total=len(records))
        for stats in pool.map_unordered(lambda a, rows: a.fill.remote(rows), chunks):
            total = CacheStats.total([total, CacheStats(**stats)])
            bar.advance(task, stats["hits"] + stats["misses"])
    for a in actors:
        ray.kill(a)
    return directory, total


__all__ = ["CacheStats", "EncodedDataset", "FeatureCache", "OFF", "cache_dir", "encode", "encoder_fingerprint",
           "file_digest", "fill_cache", "supports", "why_uncached"]
