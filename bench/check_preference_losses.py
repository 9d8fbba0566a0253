"""Our preference losses (engine/train/preference.py: dpo_loss, kto_loss + kto_kl, orpo_loss) against TRL's own
loss code, on the same numbers: per-row losses, rewards, the mean loss, and the gradient of the mean loss with
respect to the policy log-probs (mx.grad against torch autograd through TRL's code).

torch and TRL are not dependencies of lora-tui: this runs in a venv of its own (bench/.venv-trl, gitignored).
Only PyPI is reachable here (not the CPU wheel index), so torch is PyPI's default Linux wheel (CUDA libraries
included, ~3 GB; everything below runs on the CPU). MKL is not installed: engine.blas falls back by itself, and
no matmul is involved.

    uv venv bench/.venv-trl -p 3.11
    uv pip install --python bench/.venv-trl "torch==2.15.0" "trl==1.16.0" numpy "mlx[cpu]==0.32.4" pyyaml psutil
    bench/.venv-trl/bin/python bench/check_preference_losses.py

Checked with torch 2.15.0 (+cu132 wheel, run on CPU), trl 1.16.0, transformers 5.25.0, mlx 0.32.4, numpy 2.4.6.

Where TRL 1.16 keeps the losses, and what is called:
  DPO  trl.trainer.dpo_trainer.DPOTrainer._compute_loss (there is no separate dpo_loss method any more: the loss is
       computed inline from the model's per-token log-probs), loss_type "sigmoid", f_divergence_type "reverse_kl".
  KTO  trl.trainer.kto_trainer.KTOTrainer._compute_loss (likewise inline; it also computes z0 from the batch's
       mismatched "KL" completions: mean(KL_logps - ref_KL_logps), detached, clamped at 0), loss_type "kto".
  ORPO trl.experimental.orpo.orpo_trainer.ORPOTrainer.odds_ratio_loss(policy_chosen_logps, policy_rejected_logps),
       which returns +beta * logsigmoid(log odds); the trainer's loss is nll - losses.mean(), so ours = -TRL's.

The trainers are made with object.__new__ (no __init__: it would need a model, a tokenizer and a data set), and the
attributes the methods read are set the way __init__ sets them, from a real DPOConfig / KTOConfig / ORPOConfig with
our beta and weights (so TRL's own defaults pick the loss variant). Stubbed, none of which touches the maths:
  - model: a stand-in whose forward returns `log_probs` of shape (rows, 1) looked up from a table of sequence
    log-probs by input_ids[:, 0] (one "token" per completion, so TRL's sum over tokens is the sequence log-prob
    itself), plus zero `entropy`/`mean_logits`/`is_top1` used only for logged metrics;
  - precompute_ref_logps=True, so the reference log-probs come from the batch ("ref_*_logps"), as with TRL's
    precompute_ref_log_probs option, instead of a reference model's forward;
  - accelerator: device "cpu", gather / gather_for_metrics the identity (one process);
  - self.model.training=False (eval mode: skips the token counter only; _total_train_tokens=0 is only logged),
    aux_loss_enabled=False (no MoE router loss), _metrics a fresh dict, from which the per-row rewards and z0
    are read back (TRL logs them there).
_compute_loss returns only the mean loss, so per-row losses and rewards come from one call per row (the KTO KL
rows stay the whole batch's, so every call sees the same z0); the mean loss and its gradient from one call on the
whole batch.

Precision and tolerance. The numbers are drawn in float32 and fed to MLX as float32 and to torch as float64 (the
same values, exactly), so TRL's DPO/KTO run in float64 and are the reference; ORPO's odds_ratio_loss casts its inputs
to float32 itself (`.float()`), so there TRL is float32 whatever it is given. A float32 evaluation of these formulas
is good to a few ulps relative (2^-24 ~ 6e-8 each), so 1e-5 relative leaves a wide margin, except where the formula
itself cancels: KTO's 1 - sigmoid(x) (TRL's form too) once sigmoid(x) is within a few ulps of 1 has an absolute
error of ~weight * 6e-8 however small the true value is, and so has its gradient (beta * s * (1 - s) / n). A row
therefore fails when
    |ours - TRL| > 1e-5 * |TRL| + 1e-6 * max|TRL|,
max|TRL| being the largest value of that quantity in that case (the rows' common scale; a single value such as the
mean loss is held to 1.1e-5 relative). Columns: "abs" max |ours - TRL|, "rel" max |ours - TRL| / |TRL| over every
row, and "TRL32 rel" the same measure for TRL's own code run on float32 tensors against its float64 run: where "rel"
is above 1e-5 (KTO's cancelling rows; DPO rows whose loss, e.g. exp(-150), is below float32's range), TRL in
float32 is off by as much; ">1e-5" counts the rows above 1e-5 relative, ours / TRL's float32 run. Exit 1 when any
row fails. (It does fail on small slips: DPO with beta * 1.0001, KTO with the two weights swapped, or ORPO's chosen
mean log-probs scaled by 1.00001 each fail dozens of rows.)
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import engine  # noqa: E402,F401  (the BLAS preload, before mlx)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

warnings.filterwarnings("ignore")  # transformers' deprecation notices on building the configs
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import trl  # noqa: E402
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # noqa: E402

from engine.train.preference import dpo_loss, kto_kl, kto_loss, orpo_loss  # noqa: E402

ROWS = 64
RTOL = 1e-5
ATOL = 1e-6  # times the quantity's largest |TRL| value in the case
_CONFIG = dict(output_dir=tempfile.mkdtemp(prefix="trl-check-"), report_to=[], use_cpu=True, bf16=False)


class Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


class TableModel:
    """A causal LM stand-in: each input row is one "token" whose log-prob is table[input_ids[row, 0]]."""

    def __init__(self, table: torch.Tensor):
        self.table = table

    def __call__(self, input_ids, **_):
        log_probs = self.table.index_select(0, input_ids[:, 0]).unsqueeze(1)
        zeros = torch.zeros_like(log_probs.detach())
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def _common(trainer) -> None:
    trainer.model = SimpleNamespace(training=False)
    trainer.accelerator = Accelerator()
    trainer.aux_loss_enabled = False
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0  # logged as a metric, counted in train mode only


def _ids(idx) -> dict[str, torch.Tensor]:
    idx = torch.as_tensor(idx, dtype=torch.long)
    ids = torch.stack([idx, idx], dim=1)  # 2 positions: one shifted "token" per row
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": torch.ones_like(ids)}


def tensor(x: np.ndarray, dtype) -> torch.Tensor:
    return torch.tensor(np.asarray(x).astype(dtype))


# ---------------------------------------------------------------------------------------------------- TRL's side

def trl_dpo(pc, pr, rc, rr, beta, dtype=np.float64):
    args = DPOConfig(beta=beta, **_CONFIG)
    t = object.__new__(DPOTrainer)
    _common(t)
    t.beta, t.precompute_ref_logps, t.loss_types = args.beta, True, args.loss_type
    t.loss_weights = args.loss_weights or [1.0] * len(t.loss_types)
    t.ld_alpha, t.f_divergence_type, t.use_weighting = args.ld_alpha, args.f_divergence_type, args.use_weighting
    t.label_smoothing = args.label_smoothing
    n = len(pc)

    def call(rows, table):
        inputs = _ids(np.concatenate([rows, rows + n]))  # batch is [chosen, rejected]
        inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = tensor(rc[rows], dtype), tensor(rr[rows], dtype)
        return t._compute_loss(TableModel(table), inputs, return_outputs=False)

    fixed = torch.cat([tensor(pc, dtype), tensor(pr, dtype)])
    losses, chosen, rejected = [], [], []
    for i in range(n):
        losses.append(call(np.array([i]), fixed).item())
        chosen.append(t._metrics["eval"]["rewards/chosen"][-1])
        rejected.append(t._metrics["eval"]["rewards/rejected"][-1])
    table = fixed.clone().requires_grad_(True)
    mean = call(np.arange(n), table)
    mean.backward()
    return {"loss": np.array(losses), "chosen reward": np.array(chosen), "rejected reward": np.array(rejected),
            "mean loss": np.array([mean.item()]), "grad chosen": table.grad[:n].numpy(),
            "grad rejected": table.grad[n:].numpy()}


def trl_kto(policy, ref, desirable, kl_policy, kl_ref, beta, wd, wu, dtype=np.float64):
    args = KTOConfig(beta=beta, desirable_weight=wd, undesirable_weight=wu, **_CONFIG)
    t = object.__new__(KTOTrainer)
    _common(t)
    t.beta, t.precompute_ref_logps, t.loss_type = args.beta, True, args.loss_type
    t.desirable_weight, t.undesirable_weight = args.desirable_weight, args.undesirable_weight
    t.calculate_KL = args.loss_type not in ["apo_zero_unpaired"]  # as __init__ decides it
    n = len(policy)

    def call(rows, table):
        inputs = _ids(rows)
        kl_inputs = _ids(np.arange(n) + n)  # the whole batch's mismatched pairs, every call: the same z0
        inputs.update({"KL_" + k: v for k, v in kl_inputs.items()})
        inputs["label"] = torch.as_tensor(desirable[rows] > 0)
        inputs["ref_logps"], inputs["ref_KL_logps"] = tensor(ref[rows], dtype), tensor(kl_ref, dtype)
        return t._compute_loss(TableModel(table), inputs, return_outputs=False)

    fixed = torch.cat([tensor(policy, dtype), tensor(kl_policy, dtype)])
    losses, rewards = [], []
    for i in range(n):
        losses.append(call(np.array([i]), fixed).item())
        key = "rewards/chosen" if desirable[i] > 0 else "rewards/rejected"
        rewards.append(t._metrics["eval"][key][-1])
    table = fixed.clone().requires_grad_(True)
    mean = call(np.arange(n), table)
    mean.backward()
    return {"z0": np.array([t._metrics["eval"]["kl"][-1]]), "loss": np.array(losses), "reward": np.array(rewards),
            "mean loss": np.array([mean.item()]), "grad policy": table.grad[:n].numpy()}


def trl_orpo(chosen, rejected, beta, dtype=np.float64):
    args = ORPOConfig(beta=beta, **_CONFIG)
    t = object.__new__(ORPOTrainer)
    t.beta, t.accelerator = args.beta, Accelerator()
    c, r = tensor(chosen, dtype).requires_grad_(True), tensor(rejected, dtype).requires_grad_(True)
    losses, chosen_rewards, rejected_rewards, _, mean_log_odds = t.odds_ratio_loss(c, r)
    mean = -losses.mean()  # get_batch_loss_metrics: loss = policy_nll_loss - losses.mean()
    mean.backward()
    return {"loss": -losses.detach().numpy(), "chosen reward": chosen_rewards.numpy(),
            "rejected reward": rejected_rewards.numpy(), "mean log odds": np.array([mean_log_odds.item()]),
            "mean loss": np.array([mean.item()]), "grad chosen": c.grad.numpy(), "grad rejected": r.grad.numpy()}


# ---------------------------------------------------------------------------------------------------- our side

def ours_dpo(pc, pr, rc, rr, beta):
    pc, pr, rc, rr = (mx.array(x) for x in (pc, pr, rc, rr))
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta)
    grad = mx.grad(lambda a, b: mx.mean(dpo_loss(a, b, rc, rr, beta)[0]), argnums=(0, 1))(pc, pr)
    return {"loss": losses, "chosen reward": chosen, "rejected reward": rejected, "mean loss": mx.mean(losses),
            "grad chosen": grad[0], "grad rejected": grad[1]}


def ours_kto(policy, ref, desirable, kl_policy, kl_ref, beta, wd, wu):
    policy, ref, desirable = mx.array(policy), mx.array(ref), mx.array(desirable)
    z0 = kto_kl(mx.array(kl_policy), mx.array(kl_ref))
    losses, rewards = kto_loss(policy, ref, desirable, z0, beta, wd, wu)
    grad = mx.grad(lambda p: mx.mean(kto_loss(p, ref, desirable, z0, beta, wd, wu)[0]))(policy)
    return {"z0": z0, "loss": losses, "reward": rewards, "mean loss": mx.mean(losses), "grad policy": grad}


def ours_orpo(chosen, rejected, beta):
    c, r = mx.array(chosen), mx.array(rejected)
    losses, chosen_rewards, rejected_rewards, log_odds = orpo_loss(c, r, beta)
    grad = mx.grad(lambda a, b: mx.mean(orpo_loss(a, b, beta)[0]), argnums=(0, 1))(c, r)
    return {"loss": losses, "chosen reward": chosen_rewards, "rejected reward": rejected_rewards,
            "mean log odds": mx.mean(log_odds), "mean loss": mx.mean(losses), "grad chosen": grad[0],
            "grad rejected": grad[1]}


# ---------------------------------------------------------------------------------------------------- the cases

def sums(rng, n=ROWS):
    """Sequence log-probs (sums over an answer's tokens): -U(5, 200), float32."""
    return -rng.uniform(5, 200, n).astype(np.float32)


def near(rng, ref, spread):
    """A policy near its reference, as in training: ref + N(0, spread), kept below 0."""
    return np.minimum(ref + rng.normal(0, spread, len(ref)), -1e-3).astype(np.float32)


def cases():
    rng = np.random.default_rng(0)
    for beta in (0.05, 0.1, 0.5):
        pc, pr, rc, rr = sums(rng), sums(rng), sums(rng), sums(rng)
        yield f"DPO beta={beta} independent", trl_dpo, ours_dpo, (pc, pr, rc, rr, beta)
        rc, rr = sums(rng), sums(rng)
        yield f"DPO beta={beta} near ref", trl_dpo, ours_dpo, (near(rng, rc, 10), near(rng, rr, 10), rc, rr, beta)
    for beta in (0.05, 0.1, 0.5):
        for wd, wu in ((1.0, 1.0), (1.0, 2.75)):
            for z0 in ("clamped", "positive"):
                ref = sums(rng)
                policy = near(rng, ref, 20)
                desirable = (rng.uniform(size=ROWS) < 0.4).astype(np.float32)
                kl_ref = sums(rng)
                shift = -3.0 if z0 == "clamped" else 3.0  # mean(policy - ref) on the mismatched pairs
                kl_policy = np.minimum(kl_ref + shift + rng.normal(0, 2, ROWS), -1e-3).astype(np.float32)
                yield (f"KTO beta={beta} w=({wd},{wu}) z0 {z0}", trl_kto, ours_kto,
                       (policy, ref, desirable, kl_policy, kl_ref, beta, wd, wu))
    for beta in (0.05, 0.1, 0.5):
        chosen = -rng.uniform(0.01, 3, ROWS).astype(np.float32)
        rejected = -rng.uniform(0.01, 3, ROWS).astype(np.float32)
        yield f"ORPO beta={beta}", trl_orpo, ours_orpo, (chosen, rejected, beta)


def rel_error(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    diff, mag = np.abs(values - reference), np.abs(reference)
    return np.where(mag > 0, diff / np.where(mag > 0, mag, 1.0), np.where(diff > 0, np.inf, 0.0))


def compare(ours, theirs, theirs32) -> tuple[float, float, float, str, bool]:
    ours, theirs, theirs32 = (np.asarray(x, np.float64).ravel() for x in (ours, theirs, theirs32))
    diff, mag = np.abs(ours - theirs), np.abs(theirs)
    ok = bool(np.all(diff <= RTOL * mag + ATOL * mag.max())) and bool(np.all(np.isfinite(ours)))
    rel, rel32 = rel_error(ours, theirs), rel_error(theirs32, theirs)
    over = f"{int((rel > RTOL).sum())}/{int((rel32 > RTOL).sum())}"
    return float(diff.max()), float(rel.max()), float(rel32.max()), over, ok


def main() -> int:
    print(f"trl {trl.__version__}, torch {torch.__version__}, mlx {mx.__version__}, numpy {np.__version__}; "
          f"{ROWS} rows a case; a row fails when |ours - TRL| > {RTOL:g} * |TRL| + {ATOL:g} * max|TRL|")
    print(f"{'case':38s} {'quantity':16s} {'max |TRL|':>10s} {'abs':>9s} {'rel':>9s} {'TRL32 rel':>9s} "
          f"{'>1e-5':>7s}  ok")
    failed = 0
    for name, theirs_fn, ours_fn, args in cases():
        theirs, theirs32, ours = theirs_fn(*args), theirs_fn(*args, dtype=np.float32), ours_fn(*args)
        for key, ref in theirs.items():
            diff, rel, rel32, over, ok = compare(np.array(ours[key]), ref, theirs32[key])
            failed += not ok
            print(f"{name:38s} {key:16s} {np.abs(ref).max():10.3e} {diff:9.2e} {rel:9.2e} {rel32:9.2e} {over:>7s}  "
                  f"{'ok' if ok else 'FAIL'}")
    print("all within tolerance" if not failed else f"{failed} quantities out of tolerance")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
