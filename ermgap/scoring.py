"""Per-sample answer losses, label scoring and greedy generation on an EmotionCollator batch.

See `ermgap.batching.EmotionCollator` for the batch layout. All functions accept the plain
Qwen2AudioForConditionalGeneration or a peft / DeepSpeed / DDP wrapper of it.
"""

from __future__ import annotations

from contextlib import contextmanager

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


def _audio_token_id(lm) -> int:
    cfg = lm.config
    return getattr(cfg, "audio_token_id", None) or cfg.audio_token_index


def model_inputs(model, batch: dict, ids_key: str = "input_ids", mask_key: str = "attention_mask") -> dict:
    """The forward's text + audio arguments for `batch[ids_key]`.

    A batch from raw audio carries `input_features` (the model runs its audio encoder); a batch built
    from cached encoder outputs (`ermgap.feature_cache`) carries `audio_embeds` [N_audio_tokens, D], the
    projector's output at every audio position of the batch in row-major order, which is exactly the
    order in which Qwen2-Audio scatters its own encoder output into the text embeddings.
    """
    ids = batch[ids_key]
    common = {"attention_mask": batch[mask_key]}
    if "audio_embeds" not in batch:
        return {"input_ids": ids, **audio_inputs(batch), **common}
    lm = causal_lm(model)
    embeds = lm.get_input_embeddings()(ids)
    audio = (ids == _audio_token_id(lm))[..., None]
    feats = batch["audio_embeds"]
    if int(audio.sum()) != feats.shape[0]:
        raise ValueError(f"the batch has {int(audio.sum())} audio placeholder tokens but {feats.shape[0]} cached "
                         "audio feature rows")
    return {"inputs_embeds": embeds.masked_scatter(audio, feats.to(embeds.device, embeds.dtype)), **common}


@contextmanager
def _head_at(model, select):
    """Apply the LM head only to `select(hidden_states)` during the forwards inside this block.

    Qwen2-Audio's forward projects every position onto the vocabulary (no `logits_to_keep`): for the
    7B model that is [B, T, 156k] logits (and their gradient) of which training uses the few answer
    positions. A pre-forward hook on the head narrows its input, so a plain model, a peft wrapper, a
    DeepSpeed engine or a DDP module (called through their own forward, which register gradient-sync
    and accumulation hooks there) all return only the logits that are scored.
    """
    head = causal_lm(model).get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda _m, args: (select(args[0]), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def _run(model, select, **inputs):
    """Forward pass → (logits of `select(hidden_states [B, T, H])`, output)."""
    with _head_at(model, select):
        out = model(**inputs)
    return out.logits, out


# What the training forward can hand an objective besides the losses (`Objective.forward_inputs`), per example:
#   answer_hidden  the hidden state at the position that predicts the answer's first token   [B, hidden]
#   audio_hidden   the mean hidden state over the example's audio positions                   [B, hidden]
# both from the objective's `hidden_layer` (-1: the last layer after the final norm, what the LM head reads;
# k ≥ 0: the model's hidden_states[k], 0 the embeddings, k the output of decoder layer k).
FORWARD_INPUTS = ("answer_hidden", "audio_hidden")


def per_sample_loss(model, batch: dict, *, inputs: tuple[str, ...] = (), layer: int = -1):
    """Mean cross-entropy over each example's answer tokens → Tensor[B] (grad flows to trainable params).

    Uses `input_ids` / `attention_mask` / `labels` (right-padded; `labels` is -100 outside the answer)
    and the audio (`input_features` or cached `audio_embeds`). Padding and prompt tokens never enter
    the loss, and the LM head runs only on the positions that predict an answer token.
    inputs: names from FORWARD_INPUTS to return as well, from hidden layer `layer`, with autograd:
    (losses, {name: Tensor[B, hidden]}). IndexError names the layers when `layer` is out of range.
    """
    labels = batch["labels"][:, 1:]  # position t predicts token t+1
    keep = labels != IGNORE
    counts = keep.sum(-1)
    if bool((counts == 0).any()):
        raise ValueError(f"{int((counts == 0).sum())} example(s) in the batch have no answer tokens (labels all -100)")
    unknown = set(inputs) - set(FORWARD_INPUTS)
    if unknown:
        raise ValueError(f"unknown forward inputs {sorted(unknown)}; known: {list(FORWARD_INPUTS)}")
    seen: dict[str, torch.Tensor] = {}

    def select(states: torch.Tensor) -> torch.Tensor:
        if inputs and layer == -1:
            seen["states"] = states
        return states[:, :-1][keep.to(states.device)]

    extra = {"output_hidden_states": True} if inputs and layer != -1 else {}
    logits, out = _run(model, select, use_cache=False, **model_inputs(model, batch), **extra)  # [N_answer_tokens, V]
    keep = keep.to(logits.device)
    labels = labels.to(logits.device)
    token_ce = F.cross_entropy(logits.float(), labels[keep], reduction="none")
    rows = keep.nonzero()[:, 0]
    sums = torch.zeros(labels.shape[0], dtype=token_ce.dtype, device=token_ce.device).index_add(0, rows, token_ce)
    losses = sums / counts.to(sums.device)
    if not inputs:
        return losses
    if layer != -1:
        hidden = out.hidden_states
        if not -len(hidden) <= layer < len(hidden):
            raise IndexError(f"hidden layer {layer} does not exist: the model has hidden states 0..{len(hidden) - 1} "
                             "(0 the embeddings) and -1 (the last layer after the final norm)")
        seen["states"] = hidden[layer]
    return losses, {name: _pooled(name, seen["states"], batch, keep, model) for name in inputs}


def _pooled(name: str, states: torch.Tensor, batch: dict, keep: torch.Tensor, model) -> torch.Tensor:
    """One vector per example from hidden states [B, T, H] (see FORWARD_INPUTS)."""
    if name == "answer_hidden":
        first = keep.int().argmax(-1).to(states.device)  # every row has an answer token (checked by the caller)
        return states[torch.arange(states.shape[0], device=states.device), first]
    audio = (batch["input_ids"] == _audio_token_id(causal_lm(model))).to(states.device)
    n = audio.sum(-1)
    if bool((n == 0).any()):
        raise ValueError(f"{int((n == 0).sum())} example(s) in the batch have no audio positions to pool")
    return (states * audio[..., None].to(states.dtype)).sum(1) / n[:, None].to(states.dtype)


def score_labels(model, batch: dict) -> torch.Tensor:
    """Log-likelihood of each label's answer tokens given the prompt → Tensor[B, num_labels].

    One forward over the (left-padded) prompts with audio; then, label by label, one forward of that
    label's continuation for all B examples on the prompts' KV cache, which is cropped back to the
    prompt afterwards. The cache is never copied (repeating it for K labels would hold K copies: ~4 GB
    for the 7B model at batch 8 and 150 tokens). Each score is the SUM of the answer tokens'
    log-probabilities (the terminator included). Call under torch.no_grad() in eval mode.
    """
    prompt_ids, prompt_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    device = prompt_ids.device
    label_ids, label_mask = batch["label_input_ids"].to(device), batch["label_attention_mask"].to(device)
    b, k = prompt_ids.shape[0], label_ids.shape[0]
    logits, out = _run(model, lambda states: states[:, -1], position_ids=_positions(prompt_mask), use_cache=True,
                       **model_inputs(model, batch, "prompt_input_ids", "prompt_attention_mask"))
    first = torch.log_softmax(logits.float(), dim=-1)  # [B, V]: the answer's first token
    scores = first[:, label_ids[:, 0]]  # [B, K]
    if label_ids.shape[1] == 1:
        return scores
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if cache is None:
        raise RuntimeError("score_labels needs the KV cache; call it with the model in eval mode "
                           "(gradient checkpointing disables the cache in train mode)")
    prompt_len = prompt_mask.long().sum(-1)  # [B]
    extra = []
    for j in range(k):
        n = int(label_mask[j].sum())  # label j's tokens; the first was scored above
        if n < 2:
            extra.append(torch.zeros(b, device=scores.device))
            continue
        cont = label_ids[j, :n - 1].expand(b, -1)
        positions = prompt_len[:, None] + torch.arange(n - 1, device=device)[None, :]
        attn = torch.cat([prompt_mask, torch.ones_like(cont)], dim=1)
        logits, _ = _run(model, lambda states: states, input_ids=cont, attention_mask=attn, position_ids=positions,
                         cache=cache, use_cache=True)
        logp = torch.log_softmax(logits.float(), dim=-1)  # [B, n-1, V]
        targets = label_ids[j, 1:n].to(logp.device).expand(b, -1)
        extra.append(logp.gather(-1, targets[..., None])[..., 0].sum(-1))
        cache.crop(-(n - 1))  # drop label j's tokens: back to the prompt
    return scores + torch.stack(extra, dim=1).to(scores.device)


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


def generate(model, batch: dict, tokenizer, *, max_new_tokens: int = 16, with_counts: bool = False):
    """Greedy decoding from the left-padded prompts; returns the decoded answers (special tokens removed), and
    with `with_counts` also the tokens each row generated (its end-of-turn token included; `max_new_tokens`
    when it stopped for length)."""
    prompt_ids, prompt_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    end_ids = [i for i in {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id,
                           tokenizer.pad_token_id} if i is not None and i != tokenizer.unk_token_id]
    out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **audio_inputs(batch),
                         max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                         eos_token_id=end_ids, pad_token_id=tokenizer.pad_token_id)
    new = out[:, prompt_ids.shape[1]:]
    texts = [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    if not with_counts:
        return texts
    counts = [next((j + 1 for j, t in enumerate(row.tolist()) if t in end_ids), len(row)) for row in new]
    return texts, counts
