"""The preference losses on sequence log-probs (sums of log p over an answer's trained tokens), as the
papers define them and TRL computes them; everything here is element-wise over rows.

  DPO  (Rafailov et al., 2023): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))
  KTO  (Ethayarajh et al., 2024): desirable  lambda_D * (1 - sigmoid(beta * ((pi - ref) - z0)))
                                  undesirable lambda_U * (1 - sigmoid(beta * (z0 - (pi - ref))))
       z0 = max(0, mean over the batch of (pi - ref) on mismatched prompt/answer pairs), with no gradient
  ORPO (Hong et al., 2024): NLL(chosen) - beta * log sigmoid(log odds(chosen) - log odds(rejected)),
       odds from the answers' mean token log-probs; no reference model

Rewards are what practitioners watch: beta * (pi - ref) for KTO/DPO, beta * mean log p for ORPO (TRL's).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler, 2012); TRL's log1p(-exp(x)) is -inf once a
    mean log-prob rounds to 0 (a near-certain answer late in training), which would stop the run as diverged.
    x is kept below -1e-7 for the same reason."""
    x = mx.minimum(x, -1e-7)
    return mx.where(x > -0.6931472, mx.log(-mx.expm1(x)), mx.log1p(-mx.exp(x)))


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """(loss per pair, chosen rewards, rejected rewards)."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    return -nn.log_sigmoid(chosen_rewards - rejected_rewards), chosen_rewards, rejected_rewards


def kto_loss(policy, ref, desirable, kl, beta: float, desirable_weight: float, undesirable_weight: float):
    """(loss per row, reward per row); `desirable` is 1.0 for a desirable row, 0.0 for an undesirable one,
    `kl` the batch's reference point z0 (a constant: no gradient flows into it)."""
    logratio = policy - ref
    gain = desirable_weight * (1 - mx.sigmoid(beta * (logratio - kl)))
    loss = undesirable_weight * (1 - mx.sigmoid(beta * (kl - logratio)))
    return mx.where(desirable > 0, gain, loss), beta * logratio


def kto_kl(policy_mismatched, ref_mismatched):
    """z0's estimate from one batch: the mean log ratio on mismatched pairs, never below 0."""
    return mx.maximum(mx.mean(policy_mismatched - ref_mismatched), 0.0)


def orpo_loss(chosen_mean_logp, rejected_mean_logp, beta: float):
    """(odds-ratio loss per pair, i.e. -beta * log sigmoid(log odds ratio), chosen rewards, rejected rewards,
    log odds ratio). The NLL of the chosen answers is added by the caller, token-weighted like SFT."""
    # log(p / (1 - p)) with p = exp(mean log p)
    log_odds = (chosen_mean_logp - rejected_mean_logp) - (log1mexp(chosen_mean_logp) - log1mexp(rejected_mean_logp))
    return -beta * nn.log_sigmoid(log_odds), beta * chosen_mean_logp, beta * rejected_mean_logp, log_odds
