"""The preference losses against the papers' formulas written again in numpy (float64), on the same
sequence log-probs; the sequence log-probs against a plain log-softmax of the embedded model's logits; and
each method's gradient against finite differences of its loss on the embedded model. (TRL's own loss code
on the same numbers: bench/check_preference_losses.py, in a virtual environment of its own.)"""

import math

import mlx.core as mx
import numpy as np
import pytest

from engine.train.preference import dpo_loss, kto_kl, kto_loss, orpo_loss

RNG = np.random.default_rng(0)


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def f32(x):
    return mx.array(np.asarray(x, dtype=np.float32))


def close(ours, theirs, rtol=2e-5, atol=1e-6):
    np.testing.assert_allclose(np.array(ours, dtype=np.float64), theirs, rtol=rtol, atol=atol)


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5])
def test_dpo_is_the_papers_sigmoid_loss(beta):
    # Rafailov et al. (2023), eq. 7: -log sigma(beta log(pi_c/ref_c) - beta log(pi_r/ref_r))
    pc, pr, rc, rr = (-RNG.uniform(5, 120, 32) for _ in range(4))
    pc, pr, rc, rr = (np.float32(a).astype(np.float64) for a in (pc, pr, rc, rr))
    losses, chosen, rejected = dpo_loss(f32(pc), f32(pr), f32(rc), f32(rr), beta)
    close(losses, -log_sigmoid(beta * ((pc - rc) - (pr - rr))), rtol=1e-4)
    close(chosen, beta * (pc - rc))
    close(rejected, beta * (pr - rr))


@pytest.mark.parametrize("beta,weights,shift", [(0.1, (1.0, 1.0), 3.0), (0.1, (1.0, 2.75), -3.0),
                                                (0.5, (1.33, 1.0), 1.0)])
def test_kto_is_the_papers_loss_with_the_batch_kl_as_reference_point(beta, weights, shift):
    # Ethayarajh et al. (2024), eq. 8: v(x, y) = lambda_D sigma(beta (r - z0)) for desirable y, lambda_U
    # sigma(beta (z0 - r)) for undesirable; loss = lambda_y - v; z0 = max(0, mean KL on mismatched pairs).
    n = 40
    policy, ref = -RNG.uniform(5, 80, n), -RNG.uniform(5, 80, n)
    kl_policy, kl_ref = -RNG.uniform(20, 60, n), None
    kl_ref = kl_policy - shift + RNG.normal(0, 0.5, n)
    policy, ref, kl_policy, kl_ref = (np.float32(a).astype(np.float64) for a in (policy, ref, kl_policy, kl_ref))
    desirable = (RNG.random(n) < 0.7).astype(np.float64)
    z0 = max(0.0, float(np.mean(kl_policy - kl_ref)))
    ours_z0 = kto_kl(f32(kl_policy), f32(kl_ref)).item()
    assert math.isclose(ours_z0, z0, rel_tol=1e-5, abs_tol=1e-6)
    r = policy - ref
    lam = np.where(desirable > 0, weights[0], weights[1])
    value = np.where(desirable > 0, weights[0] * sigmoid(beta * (r - z0)), weights[1] * sigmoid(beta * (z0 - r)))
    losses, rewards = kto_loss(f32(policy), f32(ref), f32(desirable), ours_z0, beta, *weights)
    close(losses, lam - value, rtol=1e-4, atol=1e-6)
    close(rewards, beta * r)


@pytest.mark.parametrize("beta", [0.1, 0.25])
def test_orpo_is_the_papers_odds_ratio_term(beta):
    # Hong et al. (2024), eq. 6-7: L_OR = -log sigma(log(odds_c / odds_r)), odds = p / (1 - p), p from the
    # mean token log-prob; weighted by lambda (TRL's beta).
    c, r = -RNG.uniform(0.05, 3, 32), -RNG.uniform(0.05, 3, 32)
    c, r = np.float32(c).astype(np.float64), np.float32(r).astype(np.float64)
    pc, pr = np.exp(c), np.exp(r)
    log_odds = np.log(pc / (1 - pc)) - np.log(pr / (1 - pr))
    losses, chosen, rejected, ours_odds = orpo_loss(f32(c), f32(r), beta)
    close(ours_odds, log_odds, rtol=1e-4, atol=1e-5)
    close(losses, -beta * log_sigmoid(log_odds), rtol=1e-4, atol=1e-6)
    close(chosen, beta * c)
    close(rejected, beta * r)


# ------------------------------------------------------------------------------------ on the embedded model

def rows_for(method: str, tokenizer, n: int = 4):
    """n rows the method trains on, encoded by the real chat template: labelled chats for KTO, pairs else."""
    from engine.data import ChatEncoder, Example, parse_record
    from engine.data.pairs import encode_rows
    encoder = ChatEncoder(tokenizer)
    out = []
    for i in range(n):
        a, b = 3 + i, 11 + 2 * i
        record = ({"messages": [{"role": "user", "content": f"{a}+{b}"},
                                {"role": "assistant", "content": str(a + b if i % 2 == 0 else a + b + 5)}],
                   "label": "desirable" if i % 2 == 0 else "undesirable"} if method == "kto" else
                  {"prompt": f"{a}+{b}", "chosen": str(a + b), "rejected": f"It is {a * b}."})
        conv, issues = parse_record(record, i + 1)
        assert not issues
        enc = encode_rows(encoder, [(i + 1, conv)])[i + 1]
        out.append(Example(i + 1, conv.label, *(enc if isinstance(enc, tuple) else (enc,))))
    return out


def objective_for(method: str, tokenizer, embedded_dir, beta: float = 0.5):
    from engine.config.schema import Config
    from engine.model.adapters import apply_lora
    from engine.model.loading import load_model
    from engine.train.objective import PreferenceObjective
    from engine.train.preference_batches import PreferenceRows
    from engine.train.reference import score_rows
    cfg = Config()
    cfg.training.method, cfg.training.beta, cfg.model.max_seq_length = method, beta, 64
    cfg.lora.rank, cfg.lora.num_layers, cfg.lora.dropout = 4, 2, 0.0
    model, tok, _ = load_model(cfg.model)
    apply_lora(model, cfg.lora)
    rows = PreferenceRows(method, rows_for(method, tokenizer), 64, 0)
    objective = PreferenceObjective(cfg, model, tok.eos_token_id, rows, PreferenceRows(method, [], 64, 0))
    score_rows(objective, "train", list(range(len(rows))), "", 4)
    # Move the adapters off zero, so that policy and reference differ and every term has a gradient.
    from mlx.utils import tree_flatten, tree_unflatten
    mx.random.seed(1)
    moved = [(k, mx.random.normal(v.shape) * 0.05 if k.endswith("lora_b") else v)
             for k, v in tree_flatten(model.trainable_parameters())]
    model.update(tree_unflatten(moved))
    return objective, model


def test_sequence_logps_are_sums_of_log_softmax_over_trained_tokens(tokenizer, embedded_dir):
    from engine.train.losses import sequence_logps
    from engine.train.preference_batches import sequence_arrays
    objective, model = objective_for("dpo", tokenizer, embedded_dir)
    seqs = [objective.splits["train"].sequence(r, w) for r in range(4) for w in (0, 1)]
    inputs, targets, positions, weights, rows, _ = sequence_arrays(seqs, objective.pad_id, 64)
    ours, counts = sequence_logps(model, *map(mx.array, (inputs, targets, positions, weights, rows)))
    logits = model(mx.array(inputs)).astype(mx.float32)
    logp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True), dtype=np.float64)
    picked = np.take_along_axis(logp, targets[..., None].astype(np.int64), -1)[..., 0]
    mask = np.zeros(inputs.shape, bool)
    for s, enc in enumerate(seqs):  # the trained targets, straight from each sequence's own mask
        mask[s, :len(enc) - 1] = enc.trained[1:]
    expected = (picked * mask).sum(axis=1)
    np.testing.assert_allclose(np.array(ours), expected, rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(np.array(counts), mask.sum(axis=1))
    assert np.all(mask.sum(axis=1) > 0) and np.all(expected < 0)


@pytest.mark.parametrize("method", ["kto", "dpo", "orpo"])
def test_gradient_matches_finite_differences(method, tokenizer, embedded_dir):
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_map, tree_unflatten
    objective, model = objective_for(method, tokenizer, embedded_dir)
    rows = [0, 1, 2, 3]
    kl = objective.kl_point("train", [rows]) if method == "kto" else 0.0
    (arrays, refs, desirable) = objective.arrays("train", rows)
    inputs = [mx.array(a) for a in (*arrays[:5], refs, desirable)] + \
        [mx.array(kl, mx.float32), mx.array(0.25, mx.float32), mx.array(1.0 / 20, mx.float32)]
    loss_and_grad = nn.value_and_grad(model, objective.micro_loss)
    (loss, _), grads = loss_and_grad(model, *inputs)
    mx.random.seed(2)
    flat = tree_flatten(grads)
    direction = [(k, mx.random.normal(g.shape)) for k, g in flat]
    norm = math.sqrt(sum(mx.sum(d * d).item() for _, d in direction))
    direction = [(k, d / norm) for k, d in direction]
    analytic = sum(mx.sum(g * d).item() for (_, g), (_, d) in zip(flat, direction))
    start = dict(tree_flatten(model.trainable_parameters()))
    eps = 2e-2

    def loss_at(sign):
        model.update(tree_unflatten([(k, start[k] + sign * eps * d) for k, d in direction]))
        value = objective.micro_loss(model, *inputs)[0].item()
        model.update(tree_unflatten(list(start.items())))
        return value
    numeric = (loss_at(1) - loss_at(-1)) / (2 * eps)
    assert abs(analytic) > 1e-4, "the check needs a gradient that is not ~0"
    assert math.isclose(analytic, numeric, rel_tol=2e-2), (loss.item(), analytic, numeric)
    assert tree_map(lambda g: None, grads) is not None


def test_orpo_stays_finite_for_a_near_certain_answer():
    # TRL's log1p(-exp(x)) is -inf once a mean log-prob rounds to 0: the run would stop as diverged.
    losses, *_ , log_odds = orpo_loss(f32([-1e-9, 0.0, -2e-8]), f32([-0.5, -0.5, -1e-3]), 0.1)
    assert np.isfinite(np.array(losses)).all() and np.isfinite(np.array(log_odds)).all()
    import mlx.core as mx
    grad = mx.grad(lambda c: orpo_loss(c, f32([-0.5, -0.5, -1e-3]), 0.1)[0].sum())(f32([-1e-9, 0.0, -2e-8]))
    assert np.isfinite(np.array(grad)).all()


def test_preference_stats_read_back_from_metrics_lines():
    import json

    from engine.protocol import Eval, PreferenceStats, from_dict
    from engine.train.run_log import _jsonable
    stats = PreferenceStats("kto", 0.12, None, None, 0.5, 0.01, None)
    event = Eval(3, 0.7, float("nan"), True, 1.0, stats)
    back = from_dict(json.loads(json.dumps(_jsonable(event.to_dict()))))
    assert back.preference == stats and math.isnan(back.perplexity)
    line = json.loads(json.dumps(_jsonable(event.to_dict())))
    line["preference"]["from_a_newer_version"] = 1
    assert from_dict(line) is None  # another version's line is skipped, not a crash
