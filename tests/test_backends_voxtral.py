"""The voxtral backend on a tiny random Voxtral built locally (`ermgap model tiny --arch voxtral`), loaded through
VoxtralForConditionalGeneration: one batched, left-padded, KV-cached forward for all verbalisers gives the same
label scores as a plain forward of each (prompt + label) sequence on its own; it predicts on the synthetic corpus
through `ermgap evaluate --backend voxtral`, and `ermgap serve` serves it with the same answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from _procs import ServerProcess
from typer.testing import CliRunner

from ermgap.backends.openai_compat import OpenAICompatBackend
from ermgap.backends.registry import detect_local, local_backend
from ermgap.cli.main import app
from ermgap.config import ModelConfig, PromptConfig
from ermgap.data.audio import load_audio
from ermgap.evaluate import load_split
from ermgap.labels import EMOTIONS
from ermgap.metrics import read_predictions
from ermgap.model import VOXTRAL_AUDIO_TOKEN_ID
from ermgap.prompts import instruction_text


@pytest.fixture(scope="module")
def tiny_voxtral(tmp_path_factory):
    out = tmp_path_factory.mktemp("voxtral") / "tiny"
    res = CliRunner().invoke(app, ["model", "tiny", "--arch", "voxtral", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "Voxtral" in res.output
    return out


def _backend(path, modality="multi", mode="score"):
    return local_backend("voxtral", ModelConfig(name_or_path=str(path)), PromptConfig(), modality=modality, mode=mode)


def test_prompt_is_voxtral_instruct_format(tiny_voxtral):
    be = _backend(tiny_voxtral)
    assert detect_local(str(tiny_voxtral)) == "voxtral"
    assert be.tokens_per_chunk == 50  # 4 s chunk → 200 encoder positions → 4 stacked per token
    one, two = be.audio_chunks(np.zeros(16000 * 3)), be.audio_chunks(np.zeros(16000 * 5))
    assert one.shape == (1, 128, 400) and two.shape == (2, 128, 400)
    ids = be.prompt_ids("hi", 2)
    tok = be.tokenizer
    assert ids[:3] == [tok.bos_token_id, tok.convert_tokens_to_ids("[INST]"), tok.convert_tokens_to_ids("[BEGIN_AUDIO]")]
    assert ids.count(VOXTRAL_AUDIO_TOKEN_ID) == 100 and ids[3:103] == [VOXTRAL_AUDIO_TOKEN_ID] * 100
    assert ids[-1] == tok.convert_tokens_to_ids("[/INST]") and tok.decode(ids[103:-1]) == "hi"


def test_label_scores_equal_a_per_label_forward(tiny_voxtral, synth_corpus):
    be = _backend(tiny_voxtral)
    pc = PromptConfig()
    rows = load_split(synth_corpus, "test", modality="multi", limit=3).to_dict("records")
    audios = [load_audio(r["audio_path"]) for r in rows]
    audios[1] = np.concatenate([audios[1], audios[1], audios[1]])  # > 4 s: two chunks, a longer prompt to pad
    texts = [instruction_text(pc, "multi", r["transcript"]) for r in rows]
    answers = [pc.verbalizers[e] for e in EMOTIONS]
    scores = be.score_chat(audios, texts, answers)
    assert scores.shape == (3, 7)

    tok, model = be.tokenizer, be.model
    for i, (audio, text) in enumerate(zip(audios, texts)):
        chunks = be.audio_chunks(audio)
        prompt = be.prompt_ids(text, len(chunks))
        for j, label in enumerate(answers):
            target = tok.encode(label, add_special_tokens=False) + [tok.eos_token_id]
            ids = torch.tensor([prompt + target])
            with torch.no_grad():
                logits = model(input_ids=ids, input_features=chunks).logits[0].float()
            logp = torch.log_softmax(logits[len(prompt) - 1:-1], -1)
            want = logp.gather(-1, torch.tensor(target)[:, None]).sum()
            assert abs(float(scores[i, j]) - float(want)) < 1e-4, (i, label)


def test_evaluate_cli_with_voxtral_on_the_synthetic_corpus(tiny_voxtral, synth_corpus, tmp_path):
    out = tmp_path / "preds.csv"
    res = CliRunner().invoke(app, ["evaluate", "--backend", "voxtral", "--model", str(tiny_voxtral), "--manifest",
                                   str(synth_corpus), "--split", "test", "--modality", "uni", "--limit", "8",
                                   "--batch-size", "4", "--out", str(out)])
    assert res.exit_code == 0, res.output
    df = read_predictions(out)
    raw = pd.read_csv(out)
    scores = raw[[f"score_{e}" for e in EMOTIONS]].to_numpy()
    assert len(df) == 8 and (np.array(EMOTIONS)[scores.argmax(1)] == raw["pred"].to_numpy()).all()
    gen = _backend(tiny_voxtral, modality="uni", mode="generate")
    gen.max_new_tokens = 3
    preds = gen.predict(load_split(synth_corpus, "test", modality="uni", limit=2).to_dict("records"))
    assert all(p.answer is not None for p in preds)


@pytest.mark.slow
@pytest.mark.server
def test_ermgap_serve_serves_voxtral_like_the_local_backend(tiny_voxtral, synth_corpus, tmp_path):
    srv = ServerProcess(tiny_voxtral, tmp_path / "serve.log", token="voxtral-token-123456", served="vox")
    rows = load_split(synth_corpus, "test", modality="uni", limit=6).to_dict("records")
    want = [p.pred for p in _backend(tiny_voxtral, modality="uni").predict(rows)]
    srv.start()
    try:
        client = OpenAICompatBackend(srv.url, "vox", PromptConfig(), modality="uni", api_key=srv.token,
                                     structured=True, max_retries=0)
        got = [p.pred for p in client.predict(rows)]
    finally:
        srv.kill()
    assert got == want and "(voxtral)" in (tmp_path / "serve.log").read_text()
