"""objective.kind=adversarial: an attribute head behind a gradient-reversal layer.

Oracles: the gradient of a linear head's cross-entropy written out by hand (softmax − one-hot); the usual
detach trick for a reversal layer (h.detach() + (−α)·(h − h.detach())) on the concatenated global batch for
real gloo process groups of 2 and 3 ranks with uneven shards; scikit-learn's logistic regression as a probe
trained afterwards on the learnt features (the attribute must be harder to read with the reversal on).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_objective_distributed import TRAIN_COUNTS, _average_grads, global_batch, start_gloo, step_indices

from ermgap.objectives import OBJECTIVES, AdversarialERM, CellGrid
from ermgap.objectives.adversarial import AdversarialConfig
from ermgap.objectives.adversarial_head import grad_reverse


def _grid(strata=("a", "b"), counts=((3, 2), (2, 3))):
    return CellGrid(tuple(strata), ("F", "M"), torch.tensor(counts, dtype=torch.float64))


def test_reversal_gradient_is_minus_alpha_times_the_ordinary_one_by_hand():
    """A linear head W [2, 3], b on features h [5, 3]: the head's mean CE has dCE/dh_i = Wᵀ(p_i − y_i)/N and
    dCE/dW = Σ_i (p_i − y_i) h_iᵀ / N. Through the objective with α = 0.7: the features get −0.7 × the first,
    the head's weights exactly the second; the total is erm + the mean CE."""
    objective = AdversarialERM(_grid(), AdversarialConfig(strength=0.7, head_size=0, input_norm="none"))
    head = objective.module(3)
    h = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.2, -0.3], [-0.7, 0.9, 0.1], [0.0, 1.1, -1.2], [2.0, -0.5, 0.4]],
                     dtype=torch.float64, requires_grad=True)
    head.double()
    losses = torch.tensor([0.3, 1.2, 0.8, 0.5, 2.0], dtype=torch.float64, requires_grad=True)
    stratum, attribute = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 1, 0, 1, 1])
    out = objective(losses, stratum, attribute, inputs={"audio_hidden": h})
    out.total.backward()

    w, b = head.net.weight.detach(), head.net.bias.detach()
    logits = h.detach() @ w.T + b
    p = torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True)
    y = torch.eye(2, dtype=torch.float64)[attribute]
    ce = -(y * torch.log(p)).sum(1)
    assert out.total.item() == pytest.approx(losses.detach().mean().item() + ce.mean().item(), abs=1e-12)
    assert h.grad.numpy() == pytest.approx((-0.7 * (p - y) @ w / 5).numpy(), abs=1e-12)
    assert head.net.weight.grad.numpy() == pytest.approx(((p - y).T @ h.detach() / 5).numpy(), abs=1e-12)
    assert losses.grad.tolist() == pytest.approx([0.2] * 5, abs=1e-12)  # the task losses: plain ERM
    hits = (p.argmax(1) == attribute).double().mean().item()
    assert out.logs["adversary_acc"] == pytest.approx(hits) and out.logs["adversary_strength"] == 0.7
    assert out.logs["adversary_loss"] == pytest.approx(ce.mean().item(), abs=1e-12)

    x = torch.tensor([1.0, -2.0], requires_grad=True)
    grad_reverse(x, 2.5).sum().backward()
    assert x.grad.tolist() == [-2.5, -2.5]


def test_the_head_s_loss_weighs_every_attribute_value_alike_by_hand():
    """Train split 6 F, 2 M (shares 3/4, 1/4): weights 1/(2 × share) = 2/3 and 2, so the head's loss is
    Σ w_(a_i) CE_i / Σ w_(a_i) (torch's cross_entropy with weight=) and its gradient Σ w_(a_i) (p_i − y_i) h_iᵀ /
    Σ w_(a_i): a head that predicts F for everyone no longer has the lowest loss. balanced=false: the plain mean."""
    h = torch.tensor([[0.5, -1.0], [1.5, 0.2], [-0.7, 0.9], [0.0, 1.1]], dtype=torch.float64)
    losses = torch.tensor([0.3, 1.2, 0.8, 0.5], dtype=torch.float64)
    stratum, attribute = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 0])
    per_sample = {True: torch.tensor([2 / 3, 2, 2 / 3, 2 / 3], dtype=torch.float64), False: torch.ones(4, dtype=torch.float64)}
    for balanced, w in per_sample.items():
        objective = AdversarialERM(_grid(counts=((4, 1), (2, 1))), AdversarialConfig(head_size=0, balanced=balanced, input_norm="none"))
        head = objective.module(2).double()
        out = objective(losses, stratum, attribute, inputs={"audio_hidden": h})
        out.total.backward()
        W, b = head.net.weight.detach(), head.net.bias.detach()
        logits = h @ W.T + b
        p = torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True)
        y = torch.eye(2, dtype=torch.float64)[attribute]
        ce = -(y * torch.log(p)).sum(1)
        want = (w * ce).sum() / w.sum()
        assert out.logs["adversary_loss"] == pytest.approx(want.item(), abs=1e-12), balanced
        assert out.total.item() == pytest.approx(losses.mean().item() + want.item(), abs=1e-12)
        assert head.net.weight.grad.numpy() == pytest.approx(((w[:, None] * (p - y)).T @ h / w.sum()).numpy(), abs=1e-12)
        if balanced:
            assert want.item() == pytest.approx(F.cross_entropy(logits, attribute, weight=torch.tensor(
                [2 / 3, 2], dtype=torch.float64)).item(), abs=1e-12)


def test_warm_up_ramps_alpha_and_the_state_resumes_it():
    objective = AdversarialERM(_grid(), AdversarialConfig(strength=2.0, warmup_steps=4, head_size=8))
    head = objective.module(3).double()
    alphas = []
    for _ in range(6):
        alphas.append(objective.alpha())
        h = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
        out = objective(torch.ones(4, dtype=torch.float64), torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1]),
                        inputs={"audio_hidden": h})
        assert out.logs["adversary_strength"] == alphas[-1]
        objective.after_step(out)
    assert alphas == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0, 2.0])
    state = objective.state_dict()
    again = AdversarialERM(_grid(), AdversarialConfig(strength=2.0, warmup_steps=4, head_size=8))
    again.load_state_dict(state)
    assert again.steps == 6 and again.log_values() == objective.log_values()
    assert objective.log_values()["adversary_strength"] == 2.0
    with pytest.raises(ValueError, match="warmup_steps"):
        AdversarialERM(_grid(), AdversarialConfig(strength=2.0, warmup_steps=5)).load_state_dict(state)
    assert head.net[0].out_features == 8


def test_registered_with_its_keys_and_description():
    from ermgap.config import load_config

    assert OBJECTIVES["adversarial"] is AdversarialERM
    cfg = load_config(None, ["objective.kind=adversarial", "objective.adversarial.strength=0.5",
                             "objective.adversarial.pool=answer", "objective.adversarial.layer=1"])
    objective = AdversarialERM.from_config(cfg, _grid())
    assert objective.forward_inputs == ("answer_hidden",) and objective.hidden_layer == 1
    assert AdversarialERM.describe({"objective.adversarial.strength": "0.5"}) == "Adversarial (α=0.5)"


def test_the_head_trains_at_its_own_multiple_of_the_learning_rate():
    """objective.adversarial.head_lr_scale gives the head (the model's objective_module) its own parameter group.
    Oracle: AdamW's first step moves every parameter by lr × sign(gradient) (weight decay 0), so after one step
    the head's weights moved by 1e-3 × 10 and the adapter's by 1e-3; frozen weights are in no group."""
    from ermgap.checkpointing import OBJECTIVE_MODULE
    from ermgap.config import load_config
    from ermgap.engine import param_groups

    cfg = load_config(None, ["objective.kind=adversarial", "objective.adversarial.head_lr_scale=10",
                             "objective.adversarial.head_size=0"])  # linear: no dead ReLU, every gradient ≠ 0
    objective = AdversarialERM.from_config(cfg, _grid())
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.frozen, model.adapter = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    model.frozen.requires_grad_(False)
    model.add_module(OBJECTIVE_MODULE, objective.module(3))
    groups = param_groups(model, 1e-3, {OBJECTIVE_MODULE: objective.module_lr_scale})
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1e-2])
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in model.adapter.parameters()]
    assert [id(p) for p in groups[1]["params"]] == [id(p) for p in objective.head.parameters()]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(5, 3)
    h = model.adapter(model.frozen(x))
    (objective.head(h).logsumexp(-1).sum() + h.square().sum()).backward()
    torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.0).step()
    for n, p in model.named_parameters():
        want = 0.0 if n.startswith("frozen") else 1e-2 if n.startswith(OBJECTIVE_MODULE) else 1e-3
        assert (p.detach() - before[n]).abs() == pytest.approx(torch.full_like(p, want), rel=1e-3, abs=1e-9), n
    assert param_groups(model, 1e-3) == [{"params": [*model.adapter.parameters(), *objective.head.parameters()],
                                          "lr": 1e-3}]


def test_batch_input_norm_is_batchnorm_without_affine_in_training_and_at_evaluation():
    """objective.adversarial.input_norm=batch: the head reads what torch's BatchNorm1d(affine=False) makes of its
    input: the batch's statistics in training (the head's loss and accuracy equal the oracle's), the running
    averages the committed steps left at evaluation (attr_acc). A step never committed (no after_step) leaves
    the running averages alone."""
    torch.manual_seed(0)
    objective = AdversarialERM(_grid(), AdversarialConfig(head_size=0, input_norm="batch", balanced=False))
    head = objective.module(4).double()
    norm = torch.nn.BatchNorm1d(4, affine=False).double()
    for step in range(3):
        h = torch.randn(6, 4, dtype=torch.float64) * 3 + torch.arange(4.0, dtype=torch.float64)
        stratum, attr = torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([0, 1, 0, 1, 0, 1])
        out = objective(torch.zeros(6, dtype=torch.float64), stratum, attr, inputs={"audio_hidden": h})
        logits = head.net(norm.train()(h))
        assert out.logs["adversary_loss"] == pytest.approx(float(F.cross_entropy(logits, attr).detach()), abs=1e-12)
        assert out.logs["adversary_acc"] == pytest.approx(float((logits.argmax(1) == attr).double().mean()))
        objective.after_step(out)
    objective(torch.zeros(6, dtype=torch.float64), stratum, attr, inputs={"audio_hidden": h * 9})  # not committed
    assert torch.allclose(head.running_mean, norm.running_mean, atol=1e-12)
    assert torch.allclose(head.running_var, norm.running_var, atol=1e-12)
    h = torch.randn(50, 4, dtype=torch.float64) + 2
    attr = torch.randint(0, 2, (50,))
    hits, n = objective.evaluation_sums({"audio_hidden": h}, torch.zeros(50, dtype=torch.long), attr)["attr_acc"]
    assert n == 50 and hits == float((head.net(norm.eval()(h)).argmax(1) == attr).sum())


# ----------------------------------------------------------------------------- the reversal removes what leaks
def _toy(seed=0, n=400):
    """x: 4 task dims (the label is their argmax) and 4 noisy dims that carry the attribute (±1 shift)."""
    g = torch.Generator().manual_seed(seed)
    attr = torch.randint(0, 2, (n,), generator=g)
    task = torch.randn(n, 4, generator=g)
    noise = torch.randn(n, 4, generator=g)
    return torch.cat([0.5 * task, noise + (2 * attr[:, None] - 1)], dim=1), task.argmax(1), attr


def _train_encoder(strength: float, seed: int):
    """A 4-unit tanh encoder + task classifier + the objective's head (64 units on the raw features: with
    input_norm=batch one seed of three reads 0.75 at α 1; α warming up over 100 steps),
    600 Adam steps of 40; returns the encoder's features of the train and of a fresh set, and task accuracy."""
    torch.manual_seed(seed)
    x, y, attr = _toy()
    encoder = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Tanh())
    classifier = torch.nn.Linear(4, 4)
    objective = AdversarialERM(_grid(("all",), ((200, 200),)),
                               AdversarialConfig(strength=strength, head_size=64, warmup_steps=100,
                                                 input_norm="none"), seed=1)
    head = objective.module(4)
    opt = torch.optim.Adam([*encoder.parameters(), *classifier.parameters(), *head.parameters()], lr=0.01)
    stratum = torch.zeros(len(y), dtype=torch.long)
    for step in range(600):
        idx = torch.arange(step * 40, step * 40 + 40) % len(y)
        h = encoder(x[idx])
        out = objective(F.cross_entropy(classifier(h), y[idx], reduction="none"), stratum[idx], attr[idx],
                        inputs={"audio_hidden": h})
        opt.zero_grad()
        out.total.backward()
        opt.step()
        objective.after_step(out)
    with torch.no_grad():
        xt, yt, at = _toy(seed=100)
        ht = encoder(xt)
        return encoder(x).numpy(), attr.numpy(), ht.numpy(), at.numpy(), float((classifier(ht).argmax(1) == yt).float().mean())


def test_a_probe_trained_afterwards_reads_the_attribute_worse_with_the_reversal_on():
    """Over 3 seeds, a logistic-regression probe fitted on the learnt train features and scored on fresh data
    reads the attribute at 0.69 on average without the reversal and 0.52 (chance 0.5) with α = 1, while the
    task accuracy stays above 0.85 (measured 0.94-0.95 and 0.91-0.94)."""
    from sklearn.linear_model import LogisticRegression

    probe = {0.0: [], 1.0: []}
    for seed in (0, 1, 2):
        for strength in probe:
            h, a, ht, at, task_acc = _train_encoder(strength, seed)
            probe[strength].append(LogisticRegression(max_iter=2000).fit(h, a).score(ht, at))
            assert task_acc > 0.85, (strength, seed, task_acc)
    off, on = (sum(v) / len(v) for v in probe.values())
    assert on < 0.6 and on < off - 0.1, probe


# ----------------------------------------------------------------------------- gloo, 2 and 3 ranks
ALPHA = 0.8


def _encoder():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh()).double(), torch.nn.Linear(5, 7).double()


def _objective(input_norm="none"):
    grid = CellGrid(tuple("abcd"), ("F", "M"), torch.tensor(TRAIN_COUNTS, dtype=torch.float64))
    objective = AdversarialERM(grid, AdversarialConfig(strength=ALPHA, warmup_steps=2, head_size=4,
                                                       input_norm=input_norm), seed=3)
    objective.module(5).double()
    return objective


def _gloo_worker(rank: int, world: int, init_file: str, out_dir: str, input_norm: str) -> None:
    start_gloo(rank, world, init_file)
    try:
        x, y, stratum, attr = global_batch()
        encoder, classifier = _encoder()
        objective = _objective(input_norm)
        params = [*encoder.parameters(), *classifier.parameters(), *objective.head.parameters()]
        rows = []
        for shards in step_indices(world):
            idx = shards[rank]
            for p in params:
                p.grad = None
            h = encoder(x[idx])
            losses = F.cross_entropy(classifier(h), y[idx], reduction="none")
            res = objective(losses, stratum[idx], attr[idx], inputs={"audio_hidden": h})
            res.total.backward()
            for p in params:  # a rank whose shard is empty still backwards (zeros), as under DeepSpeed
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            _average_grads(torch.nn.ModuleList([encoder, classifier, objective.head]), world)
            objective.after_step(res)
            rows.append({"grads": [p.grad.detach().clone() for p in params], "total": res.total.item(),
                         "acc": res.logs["adversary_acc"], "buffers": [b.clone() for b in objective.head.buffers()]})
        torch.save(rows, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("world", "input_norm"), [(2, "none"), (3, "none"), (2, "batch"), (3, "batch")])
def test_gloo_ranks_with_uneven_shards_equal_one_process(world, input_norm, tmp_path):
    """Three steps (α warming up 0.4 → 0.8; the second step with cells absent; with 3 ranks one is empty):
    every rank's loss, head accuracy and averaged gradients (encoder, task classifier, attribute head) equal
    the single process's on the concatenated batch with a reversal written as the detach trick."""
    mp.spawn(_gloo_worker, args=(world, str(tmp_path / "init"), str(tmp_path), input_norm), nprocs=world, join=True)
    outs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    x, y, stratum, attr = global_batch()
    norm = torch.nn.BatchNorm1d(5, affine=False).double()  # input_norm=batch's running averages
    for step, shards in enumerate(step_indices(world)):
        alpha = ALPHA * min(1.0, (step + 1) / 2)
        idx = [i for r in shards for i in r]
        encoder, classifier = _encoder()
        head = _objective().head
        h = encoder(x[idx])
        reversed_h = h.detach() + (-alpha) * (h - h.detach())  # value h, gradient −α
        if input_norm == "batch":  # the global batch's mean and variance, constants to the gradient
            norm(h.detach())
            reversed_h = (reversed_h - h.detach().mean(0)) / (h.detach().var(0, unbiased=False) + 1e-5).sqrt()
        logits = head.net(reversed_h)
        # The head's CE weighs each attribute value by 1 / (2 × its train share): F 28 / 41, M 13 / 41
        weight = torch.tensor([41 / 56, 41 / 26], dtype=torch.float64)
        total = F.cross_entropy(classifier(h), y[idx]) + F.cross_entropy(logits, attr[idx], weight=weight)
        total.backward()
        grads = [p.grad for p in (*encoder.parameters(), *classifier.parameters(), *head.parameters())]
        acc = float((logits.argmax(1) == attr[idx]).double().mean())
        for r, out in enumerate(outs):
            got = out[step]
            assert got["total"] == pytest.approx(total.item(), abs=1e-12), (step, r)
            assert got["acc"] == pytest.approx(acc, abs=1e-12), (step, r)
            want = [norm.running_mean, norm.running_var] if input_norm == "batch" else []
            assert len(got["buffers"]) == len(want) and all(
                torch.allclose(b, ref, rtol=0, atol=1e-12) for b, ref in zip(got["buffers"], want)), (step, r)
            for g, ref in zip(got["grads"], grads):
                assert torch.allclose(g, ref, rtol=0, atol=1e-10), (step, r, (g - ref).abs().max())


# ----------------------------------------------------------------------------- the features, from the real model
def test_forward_inputs_of_the_tiny_model_equal_its_own_hidden_states(tiny_model):
    """per_sample_loss's audio_hidden / answer_hidden on a padded batch of the tiny Qwen2-Audio equal what one
    reads off the model's own forward (output_hidden_states) example by example, unpadded: the mean over the
    audio placeholder positions and the state before the answer's first token; layer -1 is what the LM head
    reads (the final norm of the last layer), layer k the model's hidden_states[k]. The head's gradient
    reaches the LoRA weights through them."""
    from test_model import _examples, _single

    from ermgap.batching import EmotionCollator
    from ermgap.config import LoraConfig, ModelConfig, PromptConfig
    from ermgap.model import apply_lora, load_backbone
    from ermgap.scoring import causal_lm, per_sample_loss

    torch.manual_seed(0)
    model, processor = load_backbone(ModelConfig(name_or_path=str(tiny_model)))
    model = apply_lora(model, LoraConfig(r=2, alpha=4, dropout=0.0))
    batch = EmotionCollator(processor, PromptConfig(), "uni")(_examples(3))
    lm = causal_lm(model)
    audio_id = lm.config.audio_token_id
    for layer in (-1, 1):
        losses, got = per_sample_loss(model, batch, inputs=("audio_hidden", "answer_hidden"), layer=layer)
        assert set(got) == {"audio_hidden", "answer_hidden"} and got["audio_hidden"].shape[0] == 3
        with torch.no_grad():
            for i in range(3):
                one = _single(batch, i)
                out = model(input_ids=one["input_ids"], input_features=one["input_features"],
                            feature_attention_mask=one["feature_attention_mask"], output_hidden_states=True)
                states = out.hidden_states[layer][0]
                if layer == -1:  # what the LM head reads: hidden_states[-1], or its final norm if it is not normed
                    head = lm.lm_head.weight.T
                    if not torch.allclose(states @ head, out.logits[0], atol=1e-5):
                        states = lm.model.language_model.norm(states)
                    assert torch.allclose(states @ head, out.logits[0], atol=1e-4)
                audio = one["input_ids"][0] == audio_id
                first = int((one["labels"][0][1:] != -100).nonzero()[0, 0])
                assert torch.allclose(got["audio_hidden"][i], states[audio].mean(0), atol=1e-5), (layer, i)
                assert torch.allclose(got["answer_hidden"][i], states[first], atol=1e-5), (layer, i)
    objective = AdversarialERM(_grid(("eng", "deu", "jpn"), ((1, 1), (1, 1), (1, 1))), AdversarialConfig())
    objective.module(got["audio_hidden"].shape[1])
    out = objective(losses, batch["stratum"], batch["attribute"], inputs=got)
    out.total.backward()
    lora = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert lora and any(g is not None and bool(g.abs().sum() > 0) for g in lora)
    with pytest.raises(IndexError, match="hidden layer 9 does not exist"):
        per_sample_loss(model, batch, inputs=("audio_hidden",), layer=9)
