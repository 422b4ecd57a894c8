"""ermgap.leakage: the pooled features of a finished run, what a probe of the protected attribute reads.

Oracle: the model's own forward (backbone + the run's adapter loaded by peft, output_hidden_states) on each
utterance alone, unpadded: the mean over its audio placeholder positions of the layer the LM head reads, or
the state before the answer's first token.
"""

from __future__ import annotations

import pytest
import torch

from ermgap.errors import ConfigError

pytestmark = [pytest.mark.ray, pytest.mark.deepspeed, pytest.mark.slow]  # they read the session's trained run


def test_pooled_features_of_a_run_equal_its_model_s_own_hidden_states(reference_run, small_manifest):
    from peft import PeftModel
    from test_model import _single

    from ermgap.batching import EmotionCollator
    from ermgap.config import load_config
    from ermgap.data.dataset import UtteranceDataset
    from ermgap.data.manifest import read_manifest
    from ermgap.leakage import pooled_features
    from ermgap.model import load_backbone
    from ermgap.preflight import resolve_task
    from ermgap.scoring import causal_lm

    run_dir = reference_run.run_dir
    rows, audio = pooled_features(run_dir, "test", pool="audio", layer=-1, batch_size=5)  # padded batches of 5
    want = read_manifest(small_manifest)
    want = want[want["split"] == "test"]
    assert rows["utt_id"].tolist() == want["utt_id"].tolist() and audio.shape == (24, 128)
    _, answer = pooled_features(run_dir, "test", pool="answer", layer=1, batch_size=24)
    assert answer.shape == (24, 128)
    assert (pooled_features(run_dir, "test")[1] == audio).all()  # the run's objective.adversarial keys: audio, -1

    cfg = load_config(run_dir / "config.yaml")
    model, processor = load_backbone(cfg.model)
    model = PeftModel.from_pretrained(model, str(run_dir / "adapter")).eval()
    lm = causal_lm(model)
    collator = EmotionCollator(processor, cfg.prompt, "uni", task=resolve_task(cfg))
    data = UtteranceDataset(rows)
    picked = [0, 7, 23]
    batch = collator([data[i] for i in picked])
    with torch.no_grad():
        for j, i in enumerate(picked):
            one = _single(batch, j)
            out = model(input_ids=one["input_ids"], input_features=one["input_features"],
                        feature_attention_mask=one["feature_attention_mask"], output_hidden_states=True)
            last = out.hidden_states[-1][0]
            if not torch.allclose(last @ lm.lm_head.weight.T, out.logits[0], atol=1e-5):
                last = lm.model.language_model.norm(last)  # what the LM head reads
            assert torch.allclose(last @ lm.lm_head.weight.T, out.logits[0], atol=1e-4)
            audio_pos = one["input_ids"][0] == lm.config.audio_token_id
            first = int((one["labels"][0][1:] != -100).nonzero()[0, 0])
            assert torch.allclose(torch.from_numpy(audio[i]), last[audio_pos].mean(0), atol=1e-5), i
            assert torch.allclose(torch.from_numpy(answer[i]), out.hidden_states[1][0][first], atol=1e-5), i
    # The adapter is the run's, not the bare backbone's: its features differ.
    bare, _ = load_backbone(cfg.model)
    with torch.no_grad():
        one = _single(batch, 0)
        first = int((one["labels"][0][1:] != -100).nonzero()[0, 0])
        states = bare(input_ids=one["input_ids"], input_features=one["input_features"],
                      feature_attention_mask=one["feature_attention_mask"], output_hidden_states=True).hidden_states
    assert not torch.allclose(torch.from_numpy(answer[0]), states[1][0][first], atol=1e-4)


def test_pooled_features_name_what_is_wrong(reference_run, tmp_path):
    from ermgap.leakage import pooled_features

    with pytest.raises(ConfigError, match="no config.yaml; not a run directory"):
        pooled_features(tmp_path, "test")
    with pytest.raises(ConfigError, match="pool 'mean' is unknown; choose one of audio, answer"):
        pooled_features(reference_run.run_dir, "test", pool="mean")


def test_the_leakage_command_probes_runs_pairs_them_and_refuses_bad_input(reference_run, tmp_path, monkeypatch,
                                                                         capsys):
    """`ermgap leakage`: its number is scikit-learn's logistic regression fitted on the run's dev features and
    scored by balanced accuracy on test (independently recomputed here); a run compared with itself differs by
    exactly 0 on every paired resample; the table fits 100 columns; bad input exits 2 before any model loads."""
    import json

    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.preprocessing import StandardScaler
    from test_data_synth import run_cli

    from ermgap.leakage import pooled_features

    monkeypatch.setenv("COLUMNS", "100")
    run = reference_run.run_dir
    out = tmp_path / "probe.json"
    code, text = run_cli(monkeypatch, capsys, "leakage", str(run), str(run), "--n-boot", "200", "--out", str(out))
    assert code == 0, text
    assert max(map(len, text.splitlines())) <= 100, text
    assert "gender read by a fresh probe: logistic regression fitted on dev (n = 24)" in text and "test (n = 24), chance 50.0 %" in text
    assert "Loading weights" not in text and "Traceback" not in text
    first, second = json.loads(out.read_text())["runs"]
    dev, dev_x = pooled_features(run, "dev")
    test, test_x = pooled_features(run, "test")
    scale = StandardScaler().fit(dev_x)
    lr = LogisticRegression(class_weight="balanced", max_iter=5000).fit(scale.transform(dev_x), dev["gender"])
    want = balanced_accuracy_score(test["gender"], lr.predict(scale.transform(test_x)))
    assert first["balanced_acc"] == pytest.approx(want) and first["n_fit"] == 24 and first["n_score"] == 24
    assert first["ci"][0] <= want <= first["ci"][1] and first["delta"] is None
    assert second["delta"] == 0 and second["delta_ci"] == [0, 0]

    def error(*bad):
        code, text = run_cli(monkeypatch, capsys, "leakage", *map(str, bad))
        assert code == 2 and "Traceback" not in text, text
        return " ".join(text.split())

    assert f"{out} already exists; pass --force" in error(run, "--out", out)
    notours = tmp_path / "mine.json"
    notours.write_text("{}")
    assert "was not written by ermgap leakage" in error(run, "--out", notours, "--force")
    assert f"{tmp_path}: no config.yaml; not a run directory" in error(run, tmp_path)
    assert "--fit and --score are both 'test'" in error(run, "--fit", "test")
    assert "no rows in split 'valid'" in error(run, "--score", "valid")
    assert "pool 'mean' is unknown" in error(run, "--pool", "mean")
