"""Per-sample answer losses, label scoring and greedy generation on an EmotionCollator batch.

See `ermgap.batching.EmotionCollator` for the batch layout. All functions accept the plain
Qwen2AudioForConditionalGeneration or a peft / DeepSpeed / DDP wrapper of it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding (RoPE positions of real tokens start at 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def causal_lm(model):
    """The Qwen2AudioForConditionalGeneration inside peft / DeepSpeed / DDP wrappers (LoRA layers stay injected)."""
    m = model
    for _ in range(8):
        if isinstance(getattr(m, "module", None), torch.nn.Module):  # DeepSpeed engine, DDP
            m = m.module
        elif hasattr(m, "get_base_model"):  # peft
            m = m.get_base_model()
        else:
            break
    return m


def audio_inputs(batch: dict) -> dict:
    """The audio tensors of a batch the model takes: Qwen2-Audio's features and their frame mask, or
    Voxtral's fixed-length feature chunks (it has no mask)."""
    return {k: batch[k] for k in ("input_features", "feature_attention_mask") if k in batch}


def _run(model, **inputs):
    """Forward pass → (states [B, T, ·], project, output); `project(states[...])` gives logits.

    For a plain or peft model, states are the decoder's last hidden states and `project` is the LM head,
    so only the positions that are scored are projected onto the vocabulary (the full [B, T, vocab]
    logits are 2 GB in fp32 for 8 × 800 tokens on the 7B model). A DeepSpeed engine or DDP module is
    called through its own forward: it registers gradient-sync and accumulation-scaling hooks there.
    """
    if isinstance(getattr(model, "module", None), torch.nn.Module):
        out = model(**inputs)
        return out.logits, (lambda x: x), out
    lm = causal_lm(model)
    out = lm.model(**inputs)
    return out.last_hidden_state, lm.lm_head, out


def per_sample_loss(model, batch: dict) -> torch.Tensor:
    """Mean cross-entropy over each example's answer tokens → Tensor[B] (grad flows to trainable params).

    Uses `input_ids` / `attention_mask` / `labels` (right-padded; `labels` is -100 outside the answer)
    and the audio features. Padding and prompt tokens never enter the loss.
    """
    states, project, _ = _run(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              input_features=batch["input_features"],
                              feature_attention_mask=batch["feature_attention_mask"], use_cache=False)
    labels = batch["labels"].to(states.device)[:, 1:]  # position t predicts token t+1
    keep = labels != IGNORE
    counts = keep.sum(-1)
    if bool((counts == 0).any()):
        raise ValueError(f"{int((counts == 0).sum())} example(s) in the batch have no answer tokens (labels all -100)")
    logits = project(states[:, :-1][keep])  # [N_answer_tokens, V]
    token_ce = F.cross_entropy(logits.float(), labels[keep], reduction="none")
    rows = keep.nonzero()[:, 0]
    sums = torch.zeros(labels.shape[0], dtype=token_ce.dtype, device=token_ce.device).index_add(0, rows, token_ce)
    return sums / counts


def score_labels(model, batch: dict) -> torch.Tensor:
    """Log-likelihood of each label's answer tokens given the prompt → Tensor[B, num_labels].

    One forward over the (left-padded) prompts with audio, whose KV cache is then repeated for
    every label, and one forward over all B×K answer continuations. Each score is the SUM of the
    answer tokens' log-probabilities (the terminator included). Call under torch.no_grad() in eval mode.
    """
    prompt_ids, prompt_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    device = prompt_ids.device
    label_ids, label_mask = batch["label_input_ids"].to(device), batch["label_attention_mask"].to(device)
    b, k = prompt_ids.shape[0], label_ids.shape[0]
    states, project, out = _run(model, input_ids=prompt_ids, attention_mask=prompt_mask,
                                position_ids=_positions(prompt_mask), **audio_inputs(batch), use_cache=True)
    first = torch.log_softmax(project(states[:, -1]).float(), dim=-1)  # [B, V]: the answer's first token
    scores = first[:, label_ids[:, 0]]  # [B, K]
    if label_ids.shape[1] == 1:
        return scores
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if cache is None:
        raise RuntimeError("score_labels needs the KV cache; call it with the model in eval mode "
                           "(gradient checkpointing disables the cache in train mode)")
    cache.batch_repeat_interleave(k)
    cont_ids = label_ids[:, :-1].repeat(b, 1)  # [B*K, La-1], row b*K + j = label j of example b
    cont_mask = label_mask[:, :-1].repeat(b, 1)
    prompt_len = prompt_mask.long().sum(-1).repeat_interleave(k)  # [B*K]
    positions = prompt_len[:, None] + torch.arange(cont_ids.shape[1], device=device)[None, :]
    attn = torch.cat([prompt_mask.repeat_interleave(k, 0), cont_mask], dim=1)
    states2, project, _ = _run(model, input_ids=cont_ids, attention_mask=attn, position_ids=positions, cache=cache,
                               use_cache=True)
    logp = torch.log_softmax(project(states2).float(), dim=-1)  # [B*K, La-1, V]
    targets = label_ids[:, 1:].repeat(b, 1)
    tok = logp.gather(-1, targets[..., None])[..., 0] * label_mask[:, 1:].repeat(b, 1)
    return scores + tok.sum(-1).view(b, k)


def answer_loss_from_scores(scores: torch.Tensor, batch: dict) -> torch.Tensor:
    """Each example's mean answer-token CE read off `score_labels` output → Tensor[B].

    The gold label's score is the summed log-probability of exactly the tokens `per_sample_loss`
    averages (verbaliser + terminator), so evaluation gets the per-sample loss (for Δdev) without a
    second forward pass over the batch.
    """
    gold = batch["gold"].to(scores.device)
    if bool((gold < 0).any()):
        raise ValueError(f"{int((gold < 0).sum())} example(s) in the batch have no gold label")
    lengths = batch["label_attention_mask"].to(scores.device).sum(-1)
    return -scores.gather(1, gold[:, None])[:, 0] / lengths[gold]


def generate(model, batch: dict, tokenizer, *, max_new_tokens: int = 16) -> list[str]:
    """Greedy decoding from the left-padded prompts; returns the decoded answers (special tokens removed)."""
    prompt_ids, prompt_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    end_ids = [i for i in {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id,
                           tokenizer.pad_token_id} if i is not None and i != tokenizer.unk_token_id]
    out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **audio_inputs(batch),
                         max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                         eos_token_id=end_ids, pad_token_id=tokenizer.pad_token_id)
    new = out[:, prompt_ids.shape[1]:]
    return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
