"""The encoder-output cache: cached forwards equal uncached ones, keys change with everything they
depend on, corrupt entries are recomputed, concurrent writers never tear an entry.

Oracle for equality: the model's own uncached forward from raw audio (log-mels through its audio
encoder), not the cache's code path.
"""

from __future__ import annotations

import multiprocessing as mp
import shutil
import time
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch

from ermgap.batching import EmotionCollator
from ermgap.config import LoraConfig, ModelConfig, PromptConfig, load_config
from ermgap.data.dataset import UtteranceDataset
from ermgap.data.manifest import read_manifest
from ermgap.feature_cache import EncodedDataset, FeatureCache, cache_dir, encoder_fingerprint, file_digest
from ermgap.model import apply_lora, load_backbone
from ermgap.scoring import per_sample_loss, score_labels


@pytest.fixture(scope="module")
def lora_model(tiny_model):
    torch.manual_seed(0)
    model, processor = load_backbone(ModelConfig(name_or_path=str(tiny_model), dtype="fp32"))
    model = apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # non-zero LoRA B so the adapter really changes the language model
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(hash(name) % 2**31))
    return model.eval(), processor


@pytest.fixture(scope="module")
def rows(synth_corpus):
    df = read_manifest(synth_corpus)
    # Mixed lengths, both genders, all languages; some rows longer than the tiny model's 4 s window?
    return df.groupby(["language", "gender"]).head(1).reset_index(drop=True)


def _fingerprint(model, processor, **kw):
    return encoder_fingerprint(model, processor.feature_extractor, sample_rate=16000, max_audio_s=kw.get("max_audio_s"))


def _encoded(model, processor, rows, directory) -> EncodedDataset:
    base = UtteranceDataset(rows)
    return EncodedDataset(base, FeatureCache(directory, _fingerprint(model, processor)), model, processor,
                          batch_size=4)


@pytest.mark.parametrize("modality", ["uni", "multi"])
def test_cached_forward_equals_uncached(lora_model, rows, tmp_path, modality):
    model, processor = lora_model
    collator = EmotionCollator(processor, PromptConfig(), modality)
    base = UtteranceDataset(rows)
    enc = _encoded(model, processor, rows, tmp_path)
    enc.fill()
    idx = list(range(len(rows)))
    raw = collator([base[i] for i in idx])
    cached = collator([enc[i] for i in idx])
    assert "input_features" not in cached and "audio_embeds" in cached
    for key in ("input_ids", "labels", "prompt_input_ids", "attention_mask"):
        assert torch.equal(raw[key], cached[key]), key
    loss_raw = per_sample_loss(model, raw)
    loss_cached = per_sample_loss(model, cached)
    torch.testing.assert_close(loss_cached, loss_raw, atol=1e-5, rtol=0)
    loss_cached.sum().backward()  # the LoRA weights get gradients through the cached path too
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n)
    model.zero_grad()
    with torch.no_grad():
        torch.testing.assert_close(score_labels(model, cached), score_labels(model, raw), atol=1e-5, rtol=0)


def test_fill_counts_misses_then_hits(lora_model, rows, tmp_path):
    model, processor = lora_model
    first = _encoded(model, processor, rows, tmp_path)
    first.fill()
    assert (first.cache.stats.misses, first.cache.stats.hits) == (len(rows), 0)
    assert first.cache.stats.encoder_s > 0
    again = _encoded(model, processor, rows, tmp_path)
    again.fill()
    assert (again.cache.stats.misses, again.cache.stats.hits) == (0, len(rows))
    for i in range(len(rows)):
        torch.testing.assert_close(again[i]["audio_embeds"], first[i]["audio_embeds"], atol=0, rtol=0)
    # every read served from the cache is a hit (epochs of training reuse the entries), never a miss
    for _epoch in range(2):
        for i in range(len(rows)):
            again[i]
    assert (again.cache.stats.misses, again.cache.stats.hits) == (0, 4 * len(rows))
    assert (first.cache.stats.misses, first.cache.stats.hits) == (len(rows), len(rows))


def test_key_changes_with_audio_settings_and_encoder_weights_only(lora_model, tiny_model, rows, tmp_path):
    model, processor = lora_model
    fp = _fingerprint(model, processor)
    assert _fingerprint(model, processor, max_audio_s=2.0) != fp
    fe = type(processor.feature_extractor)(**{**processor.feature_extractor.to_dict(), "chunk_length": 3})
    assert encoder_fingerprint(model, fe, sample_rate=16000, max_audio_s=None) != fp
    # Language-model weights (LoRA or base) do not enter the key: every trial of a sweep shares entries.
    fresh, _ = load_backbone(ModelConfig(name_or_path=str(tiny_model), dtype="fp32"))
    assert _fingerprint(fresh, processor) == fp
    with torch.no_grad():
        fresh.model.language_model.layers[0].mlp.up_proj.weight.add_(1.0)
        assert _fingerprint(fresh, processor) == fp
        fresh.model.audio_tower.layers[0].fc1.weight[0, 0] += 1e-3
        assert _fingerprint(fresh, processor) != fp
        fresh.model.audio_tower.layers[0].fc1.weight[0, 0] -= 1e-3
        fresh.model.multi_modal_projector.linear.bias[0] += 1e-3
        assert _fingerprint(fresh, processor) != fp
    assert _fingerprint(fresh.to(torch.bfloat16), processor) != fp  # the dtype changes the features
    # The audio: a file with other bytes under the same path gets another key.
    wav = tmp_path / "a.wav"
    shutil.copy(rows["audio_path"][0], wav)
    cache = FeatureCache(tmp_path, fp)
    k0 = cache.key(file_digest(wav))
    shutil.copy(rows["audio_path"][1], wav)
    assert cache.key(file_digest(wav)) != k0


def test_corrupt_or_truncated_entries_are_recomputed_with_a_warning(lora_model, rows, tmp_path):
    model, processor = lora_model
    enc = _encoded(model, processor, rows, tmp_path)
    enc.fill()
    good = [enc[i]["audio_embeds"] for i in range(2)]
    truncated, flipped = enc.cache.path(enc.keys[0]), enc.cache.path(enc.keys[1])
    truncated.write_bytes(truncated.read_bytes()[:-37])
    data = bytearray(flipped.read_bytes())
    data[-5] ^= 0xFF  # inside the tensor bytes: parses, but the checksum no longer matches
    flipped.write_bytes(bytes(data))
    again = _encoded(model, processor, rows, tmp_path)
    with pytest.warns(UserWarning, match="corrupt") as record:
        again.fill()
    messages = " ".join(str(w.message) for w in record)
    assert str(truncated) in messages and str(flipped) in messages and "checksum" in messages
    assert (again.cache.stats.misses, again.cache.stats.corrupt) == (2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # repaired: no warning any more
        for i in range(2):
            torch.testing.assert_close(again[i]["audio_embeds"], good[i], atol=1e-6, rtol=0)


def _writer(directory: str, fingerprint: str, seed: int, rounds: int) -> None:
    cache = FeatureCache(directory, fingerprint)
    t = torch.arange(20_000, dtype=torch.float32).reshape(100, 200)  # the same content from every writer
    for _ in range(rounds):
        cache.store(cache.key("same-audio"), t)


def test_concurrent_writers_never_leave_a_torn_entry(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), "fp", s, 40)) for s in range(3)]
    for p in procs:
        p.start()
    reader = FeatureCache(tmp_path, "fp")
    seen = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a torn read would warn "corrupt"
        while any(p.is_alive() for p in procs):
            t = reader.load(reader.key("same-audio"))
            if t is not None:
                seen += 1
                assert t.shape == (100, 200) and float(t[-1, -1]) == 19_999.0
            time.sleep(0.002)  # keep reading while they write, without taking a core from them
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert seen > 0 and reader.stats.corrupt == 0
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [reader.path(reader.key("same-audio")).name]


def _filler(model_dir: str, manifest: str, directory: str, barrier, results) -> None:
    torch.set_num_threads(1)
    model, processor = load_backbone(ModelConfig(name_or_path=model_dir, dtype="fp32"))
    data = _encoded(model, processor, read_manifest(manifest), directory)
    barrier.wait()  # both start filling at the same moment, like a sweep's first two trials
    with torch.no_grad():
        data.fill()
    results.put((data.cache.stats.misses, data.cache.stats.hits))


def test_two_trials_filling_one_cache_at_once_encode_each_utterance_about_once(synth_corpus, tiny_model, tmp_path):
    """Oracle: the corpus size. Two processes that visited the batches in the same order would each encode
    nearly all of it (measured before the change: 1.85x the corpus for a 4-trial sweep)."""
    n = len(read_manifest(synth_corpus))
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_filler, args=(str(tiny_model), str(synth_corpus), str(tmp_path), barrier, results))
             for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert all(misses + hits == n for misses, hits in got)
    assert len(list(tmp_path.rglob("*.safetensors"))) == n
    total = sum(misses for misses, _ in got)
    assert total <= 1.3 * n, f"{total} encodings for {n} utterances: {got}"


def test_cache_location_and_off_switch(tmp_path):
    cfg = load_config(None, [f"tracking.storage_path={tmp_path}/runs"])
    assert cache_dir(cfg) == tmp_path / "runs" / "feature_cache"
    assert cache_dir(load_config(None, [f"data.feature_cache={tmp_path}/shared"])) == tmp_path / "shared"
    assert cache_dir(load_config(None, ["data.feature_cache=off"])) is None
    assert cache_dir(load_config(None, ["lora.train_audio_encoder=true", f"data.feature_cache={tmp_path}"])) is None


def test_lm_head_runs_only_on_answer_positions(lora_model, rows):
    """Training projects only the answer positions onto the vocabulary (not [B, T, V])."""
    model, processor = lora_model
    batch = EmotionCollator(processor, PromptConfig(), "uni")([UtteranceDataset(rows)[i] for i in range(3)])
    seen = []
    head = model.get_base_model().lm_head
    handle = head.register_forward_hook(lambda _m, args, out: seen.append(tuple(out.shape)))
    try:
        per_sample_loss(model, batch)
    finally:
        handle.remove()
    n_answer = int((batch["labels"] != -100).sum())
    assert seen == [(n_answer, head.out_features)]
    assert pd.Series(batch["attention_mask"].sum(-1).tolist()).min() > 10 * n_answer / 3  # far fewer than all


def test_evaluate_backend_with_cache_equals_without(tiny_model, rows, tmp_path):
    from ermgap.backends.qwen2_audio import Qwen2AudioBackend

    records = rows.head(4).to_dict("records")
    cfg = ModelConfig(name_or_path=str(tiny_model), dtype="fp32")
    plain = Qwen2AudioBackend(cfg, PromptConfig(), modality="uni").predict(records)
    cached_be = Qwen2AudioBackend(cfg, PromptConfig(), modality="uni", feature_cache=str(tmp_path))
    first, again = cached_be.predict(records), cached_be.predict(records)
    # each predict fills (finds or encodes each entry), then reads each entry: 4 encodings, 4 + 8 reads served
    assert cached_be.cache.stats.misses == 4 and cached_be.cache.stats.hits == 12
    for p, c1, c2 in zip(plain, first, again):
        assert p.pred == c1.pred == c2.pred
        assert c1.scores == pytest.approx(p.scores, abs=1e-5) and c2.scores == pytest.approx(p.scores, abs=1e-5)


@pytest.mark.slow
@pytest.mark.ray
def test_features_build_cli_fills_the_cache_once(ray_cluster, synth_corpus, tiny_model, tmp_path):
    """`ermgap features build` with 2 Ray actors (on the session's cluster): every utterance encoded once, a
    rerun only hits."""
    import os
    import subprocess
    import sys

    df = read_manifest(synth_corpus)
    cmd = [sys.executable, "-m", "ermgap.cli.main", "features", "build", "configs/tiny.yaml",
           f"data.manifest={synth_corpus}", f"model.name_or_path={tiny_model}", f"tracking.storage_path={tmp_path}",
           "distributed.cpus_per_worker=0.5", "optim.effective_batch_size=8", "optim.micro_batch_size=4",
           "--address", ray_cluster]
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"}
    repo = Path(__file__).resolve().parent.parent
    first = subprocess.run(cmd + ["--workers", "2"], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"0 already cached, {len(df)} encoded" in " ".join(first.stdout.split())
    entries = list((tmp_path / "feature_cache").rglob("*.safetensors"))
    assert len(entries) == df["audio_path"].nunique()
    again = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{len(df)} already cached, 0 encoded" in " ".join(again.stdout.split())
