"""The AAO objective (Ambiguity Awareness Optimization, arXiv 2511.23391) and its sequence-level relatives.

Read top to bottom, this file is the method:
  DPO and its relatives (Eq. 2) on sequence log-probs -> token similarity (Eq. 7)
  -> thresholds a, b from the logits (Eq. 8) -> token weights (Eq. 14-17) -> weighted log-ratios
  -> auxiliary losses (Eq. 9-13) -> MixDPO routing -> the whole objective -> metrics.
Every function takes tensors and imports only torch. Per-token tensors are (pairs*2, K) with the chosen
answers in the first half and the rejected in the second, K positions aligned with the predicted token,
and `mask` marks answer tokens (prompt and padding are 0). The per-token log-probs themselves (Eq. 1)
come from model.py's chunked head, which never builds the (rows, K, vocab) logits.
Where the printed equations are ambiguous or wrong, the comment says what is printed, what is done, why.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------- pairs

def split_pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B, ...) stacked [chosen; rejected] -> chosen (B, ...), rejected (B, ...)."""
    return x.chunk(2, dim=0)


# ----------------------------------------------------------------------------- Eq. 2: DPO and relatives
# Inputs are (weighted) sequence log-probs, one per pair; every loss returns a per-pair loss (B,).
# beta is a float or a (B,) tensor (SP2DPO's per-pair β).

def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """Eq. 2: -log σ(β[log π_θ(y_w)/π_ref(y_w) - log π_θ(y_l)/π_ref(y_l)])."""
    margin = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    return -F.logsigmoid(beta * margin)


def cdpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
              label_smoothing=0.1):
    """Conservative DPO: the DPO loss with the preference label flipped with probability ε."""
    margin = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    return -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)


def ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """IPO (Azar et al. 2024): regress the log-ratio margin onto 1/(2β) instead of pushing it to infinity."""
    margin = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    return (margin - 1 / (2 * beta)) ** 2


def hinge_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """SLiC-style hinge on the β-scaled log-ratio margin."""
    margin = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    return F.relu(1 - beta * margin)


def simpo_loss(policy_chosen_avg_logps, policy_rejected_avg_logps, beta, gamma=0.5):
    """SimPO (Meng et al. 2024): reference-free, length-normalized log-probs, target margin γ."""
    return -F.logsigmoid(beta * (policy_chosen_avg_logps - policy_rejected_avg_logps) - gamma)


def sft_loss(policy_chosen_avg_logps):
    """Plain NLL per token of the chosen answer (the SFT stage, and MixDPO's hard pairs)."""
    return -policy_chosen_avg_logps


# ----------------------------------------------------------------------------- Eq. 7: token similarity

@torch.no_grad()
def token_similarity(emb_w, emb_l, mask_w, mask_l):
    """Eq. 7: S for every answer token = its highest normalized cosine similarity to the other answer.

    emb_w (B, Kw, D), emb_l (B, Kl, D): input embeddings of the answer tokens; masks (B, K), 1 = answer token.
    Printed, Eq. 7 min-max normalizes each row and then takes that row's max, which is always exactly 1.
    The text says "min-max normalization over all cross-answer token similarities": normalize with the
    min and max of the pair's whole masked matrix, then S_w[i] = max_j Cn[i, j], S_l[j] = max_i Cn[i, j].
    Padded positions never enter a min, a max or a score (their S is 0). Detached: S is an input.
    One pair without the batch dimension, (K, D) and (K,), works too.
    """
    if emb_w.dim() == 2:
        return tuple(S[0] for S in token_similarity(emb_w[None], emb_l[None], mask_w[None], mask_l[None]))
    dtype = torch.promote_types(emb_w.dtype, torch.float32)
    C = F.normalize(emb_w.to(dtype), dim=-1) @ F.normalize(emb_l.to(dtype), dim=-1).transpose(1, 2)  # (B, Kw, Kl)
    valid = mask_w.bool()[:, :, None] & mask_l.bool()[:, None, :]
    lo = C.masked_fill(~valid, math.inf).amin(dim=(1, 2), keepdim=True)
    hi = C.masked_fill(~valid, -math.inf).amax(dim=(1, 2), keepdim=True)
    # A degenerate matrix (max == min: one token each, or all alike) has no spread to normalize by:
    # keep the raw cosine there, clamped to [0, 1], so that identical answers still score 1.
    degenerate = ~(hi - lo > 1e-12)
    Cn = torch.where(degenerate, C.clamp(0, 1), (C - lo) / torch.where(degenerate, 1.0, hi - lo))
    Cn = Cn.masked_fill(~valid, -math.inf)
    S_w = Cn.amax(dim=2).masked_fill(~mask_w.bool(), 0.0)  # (B, Kw)
    S_l = Cn.amax(dim=1).masked_fill(~mask_l.bool(), 0.0)  # (B, Kl)
    return S_w, S_l


# ----------------------------------------------------------------------------- Eq. 8: thresholds

def pooled_answer_logits(logit_sums: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """AW's input: the policy's logits, detached, mean-pooled over the answer tokens of both answers of a
    pair: one (a, b) per pair, since Eq. 16 gives a and b no token index. logit_sums (2B, V) are each row's
    logits summed over its answer tokens (model.AnswerStates.logit_sums); mask (2B, K). -> (B, V) fp32."""
    chosen, rejected = split_pairs(logit_sums.detach().float())
    n_chosen, n_rejected = split_pairs(mask.float().sum(1))
    return (chosen + rejected) / (n_chosen + n_rejected).clamp_min(1)[:, None]


class ThresholdMLP(nn.Module):
    """Eq. 8: a, b = AW(P(y | x, θ)), with 1 > a > b > 0 for any finite input.

    Sized as the paper reports: on a 32,000 vocabulary, vocab x 512 fp32 weights are 62.50 MiB (fc1 has
    no bias: its input is centred per pair). The paper "clips" to keep a > b; clipping has no gradient,
    so a differentiable map does it: b = σ(u), a = b + (1 - b)·σ(v), with u, v kept inside (-4, 4) by a
    soft bound so that a - b never rounds to 0. The input is standardized first: logits carry an
    arbitrary shift (softmax ignores it) and a scale that grows in training; neither should move a, b.
    The last layer starts at zero weights with biases giving a = 0.8, b = 0.4: moderate thresholds.
    """

    def __init__(self, vocab_size: int, hidden: int = 512, init_a: float = 0.8, init_b: float = 0.4,
                 bound: float = 4.0):
        super().__init__()
        self.bound = bound
        self.fc1 = nn.Linear(vocab_size, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, 2)
        u0 = math.log(init_b / (1 - init_b))
        r = (init_a - init_b) / (1 - init_b)
        v0 = math.log(r / (1 - r))
        with torch.no_grad():
            self.fc2.weight.zero_()
            self.fc2.bias.copy_(torch.tensor([u0, v0]).div(bound).atanh().mul(bound))

    def forward(self, pooled_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = pooled_logits.float()
        x = x / x.abs().amax(-1, keepdim=True).clamp_min(1e-30)  # into [-1, 1]: no overflow below
        x = F.layer_norm(x, x.shape[-1:])
        u, v = (self.bound * torch.tanh(self.fc2(F.gelu(self.fc1(x))) / self.bound)).unbind(-1)
        b = torch.sigmoid(u)
        a = b + (1 - b) * torch.sigmoid(v)
        return a, b


# ----------------------------------------------------------------------------- Eq. 14-17: weights

def aao_weights(S: torch.Tensor, a, b, alpha: float = 200.0) -> torch.Tensor:
    """Eq. 17, the smooth form of Eq. 16 that lets the loss reach a and b:
    w = (1-S)²·σ(α(S-a)) + (1+S)·σ(α(b-S)) + 1 - σ(α(S-a)) - σ(α(b-S)).
    Ambiguous tokens (S > a) get Eq. 14's (1-S)², key tokens (S < b) Eq. 15's 1+S, transitional ones 1.
    (Eq. 16 as printed reads "a < S < b" for the middle case; with a > b that is b < S < a.)
    S (B, K); a, b floats or (B,) tensors, one pair each."""
    a = torch.as_tensor(a, dtype=S.dtype, device=S.device)
    b = torch.as_tensor(b, dtype=S.dtype, device=S.device)
    if a.dim() == 1:
        a, b = a[:, None], b[:, None]
    ambiguous = torch.sigmoid(alpha * (S - a))
    key = torch.sigmoid(alpha * (b - S))
    return (1 - S) ** 2 * ambiguous + (1 + S) * key + 1 - ambiguous - key


def random_weights(mask: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """DPO-Random (Table 2): i.i.d. U(0, 2) token weights. Mean 1, so the total weight matches plain DPO
    in expectation, and the range is that of AAO's weights: only *which* tokens count differs.
    One seed per row, so a row gets the same weights whatever the batch or the number of processes."""
    rows = [torch.rand(mask.shape[1], generator=torch.Generator().manual_seed(s)) for s in seeds]
    return torch.stack(rows).to(mask.device) * 2


def weighted_sequence_logps(logps: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_t w_t log π(y_t) over answer tokens: Eq. 4's sum with each token's factor weighted. Used with the
    same weights for policy and reference, it gives the weighted log-ratio Σ_t w_t (log π_θ - log π_ref)."""
    return (logps * weights * mask).sum(-1)


# ----------------------------------------------------------------------------- Eq. 9-13: auxiliary losses

def contrastive_suppression_loss(hidden_w, hidden_l, weights_w, weights_l, mask_w, mask_l):
    """Eq. 9-10: L_contrastive = S_pref + S_dis, the weighted mean cosine between the two answers' tokens.

    Printed, the cosine is taken of E_i·w_i and E_j·w_j; the cosine ignores positive scales, so the loss
    could not reach the weights. Read as Σ_i Σ_j w_i w_j cos(h_w,i, h_l,j) / (T_p·T_d), with h the policy's
    final (normed) hidden states. S_dis is the same double sum in the other order, hence equal to S_pref.
    The double sum factorizes, Σ_i Σ_j w_i w_j (ĥ_i · ĥ_j) = (Σ_i w_i ĥ_i) · (Σ_j w_j ĥ_j) with ĥ = h/|h|:
    O(K·D) work instead of a K_w x K_l matrix. Returns (B,)."""
    dtype = torch.promote_types(hidden_w.dtype, torch.float32)  # bf16 hidden states: cosines in fp32
    ww, wl = (weights_w * mask_w).to(dtype), (weights_l * mask_l).to(dtype)
    sum_w = torch.einsum("bi,bid->bd", ww, F.normalize(hidden_w.to(dtype), dim=-1))  # (B, D)
    sum_l = torch.einsum("bj,bjd->bd", wl, F.normalize(hidden_l.to(dtype), dim=-1))
    s_pref = (sum_w * sum_l).sum(-1) / (mask_w.sum(1) * mask_l.sum(1)).clamp_min(1)
    s_dis = s_pref  # Eq. 9's second line: cos is symmetric
    return s_pref + s_dis


def reward_enhancement_loss(chosen_logps, weights, mask, length_normalized: bool = True):
    """Eq. 11-12: L_reward = -E[Σ_t w_t log π_θ(y_w,t)] on the chosen answer, under the AAO weights.
    A raw sum over hundreds of tokens would dwarf the DPO loss; by default it is divided by Σ_t w_t."""
    reward = (chosen_logps * weights * mask).sum(-1)
    if length_normalized:
        reward = reward / (weights * mask).sum(-1).clamp_min(1e-6)
    return -reward


def total_loss(preference, contrastive, reward, lambda_c: float = 1.0, lambda_r: float = 1.0):
    """Eq. 13 added to the preference loss: L = L_DPO + λ_c·L_contrastive + λ_r·L_reward."""
    return preference + lambda_c * contrastive + lambda_r * reward


# ----------------------------------------------------------------------------- MixDPO

def mixdpo_route(preference_losses, sft_losses, margin, tau: float):
    """MixDPO: pairs whose data margin (score_chosen - score_rejected) is below τ are too hard for a
    preference loss but still teach through SFT on their chosen answer; the others take the preference loss."""
    return torch.where(margin < tau, sft_losses, preference_losses)


# ----------------------------------------------------------------------------- the whole objective

PAIR_LOSSES = {"dpo": dpo_loss, "ipo": ipo_loss, "cdpo": cdpo_loss, "hinge": hinge_loss}


@dataclass
class Objective:
    loss: str = "dpo"  # dpo | ipo | cdpo | hinge | simpo | sft
    weighting: str = "aao"  # none | random | aao
    beta: float = 0.1
    label_smoothing: float = 0.1  # cdpo's ε
    gamma: float = 0.5  # simpo's target margin
    alpha: float = 200.0  # Eq. 17
    lambda_c: float = 1.0  # Eq. 13
    lambda_r: float = 1.0
    reward_length_normalized: bool = True  # Eq. 11-12
    sft_below_margin: float | None = None  # MixDPO's τ


def token_weights(obj: Objective, mask, embeds=None, a=None, b=None, seeds=None):
    """The weighting, orthogonal to the loss. Returns (weights, S), both (2B, K); S is None unless aao."""
    if obj.weighting == "none":
        return torch.ones_like(mask), None
    if obj.weighting == "random":
        return random_weights(mask, seeds), None
    mask_w, mask_l = split_pairs(mask)
    S = torch.cat(token_similarity(*split_pairs(embeds.detach()), mask_w, mask_l)).to(mask.dtype)
    return aao_weights(S, torch.cat([a, a]), torch.cat([b, b]), obj.alpha), S


@dataclass
class ObjectiveOutput:
    """A batch's per-pair losses, and what the metrics and the weights page read."""
    losses: torch.Tensor  # (B,) what is minimized: the pairwise loss, plus Eq. 13's terms under aao
    preference: torch.Tensor  # (B,) the pairwise loss alone (Eq. 2 or a relative)
    chosen_rewards: torch.Tensor  # (B,) implicit reward of the chosen answer (β x its log-ratio)
    rejected_rewards: torch.Tensor  # (B,)
    weights: torch.Tensor  # (2B, K) token weights; 1 without weighting
    similarity: torch.Tensor | None = None  # (2B, K) S of Eq. 7, aao only
    contrastive: torch.Tensor | None = None  # (B,) Eq. 9-10, aao only
    reward_enhancement: torch.Tensor | None = None  # (B,) Eq. 11-12, aao only


def preference_objective(obj: Objective, policy_logps, ref_logps, mask, *, beta=None, embeds=None,
                         hidden=None, a=None, b=None, margin=None, seeds=None) -> ObjectiveOutput:
    """The per-pair loss (B,) of a batch, and what the metrics need.

    policy_logps, ref_logps, mask: (2B, K). embeds, hidden: (2B, K, D), the input embeddings and final
    hidden states at the same positions (aao only). a, b: (B,) thresholds from ThresholdMLP (aao only).
    beta: float or (B,) (SP2DPO); margin: (B,) data margins (MixDPO); seeds: 2B ints (random weighting).
    """
    beta = obj.beta if beta is None else beta
    mask = mask.to(policy_logps.dtype)
    weights, S = token_weights(obj, mask, embeds, a, b, seeds)
    lengths = split_pairs((weights * mask).sum(-1).clamp_min(1e-6))
    policy_c, policy_r = split_pairs(weighted_sequence_logps(policy_logps, weights, mask))
    chosen_avg_nll = sft_loss(split_pairs((policy_logps * mask).sum(-1) / mask.sum(-1).clamp_min(1))[0])
    if obj.loss in PAIR_LOSSES:
        ref_c, ref_r = split_pairs(weighted_sequence_logps(ref_logps, weights, mask))
        extra = {"label_smoothing": obj.label_smoothing} if obj.loss == "cdpo" else {}
        losses = PAIR_LOSSES[obj.loss](policy_c, policy_r, ref_c, ref_r, beta, **extra)
        rewards = beta * (policy_c - ref_c), beta * (policy_r - ref_r)
    elif obj.loss == "simpo":
        losses = simpo_loss(policy_c / lengths[0], policy_r / lengths[1], beta, obj.gamma)
        rewards = beta * policy_c / lengths[0], beta * policy_r / lengths[1]
    elif obj.loss == "sft":
        losses = chosen_avg_nll
        rewards = -chosen_avg_nll, torch.zeros_like(chosen_avg_nll)
    else:
        raise ValueError(f"unknown loss {obj.loss!r}")
    if obj.sft_below_margin is not None:
        losses = mixdpo_route(losses, chosen_avg_nll, margin, obj.sft_below_margin)
    out = ObjectiveOutput(losses, losses, *rewards, weights, S)
    if obj.weighting == "aao":
        (w_w, w_l), (m_w, m_l) = split_pairs(weights), split_pairs(mask)
        out.contrastive = contrastive_suppression_loss(*split_pairs(hidden), w_w, w_l, m_w, m_l)
        out.reward_enhancement = reward_enhancement_loss(split_pairs(policy_logps)[0], w_w, m_w,
                                                         obj.reward_length_normalized)
        out.losses = total_loss(losses, out.contrastive, out.reward_enhancement, obj.lambda_c, obj.lambda_r)
    return out


# ----------------------------------------------------------------------------- metrics

def preference_accuracy(margin: torch.Tensor) -> torch.Tensor:
    """Share of pairs ranked right by the implicit reward; a tie (policy = reference, at step 0) counts
    half, so an untrained policy scores 0.5, not 0."""
    return ((margin > 0).float() + 0.5 * (margin == 0).float()).mean()


@torch.no_grad()
def objective_metrics(out: ObjectiveOutput, mask, a=None, b=None) -> dict[str, torch.Tensor]:
    """Detached 0-dim tensors (no host sync here): rewards, their margin and accuracy, and for aao the
    thresholds and the shares of ambiguous (S > a), transitional and key (S < b) tokens by the hard
    thresholds of Eq. 16."""
    chosen, rejected = out.chosen_rewards, out.rejected_rewards
    m = {"loss": out.losses.mean(), "rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
         "rewards/margin": (chosen - rejected).mean(), "rewards/accuracy": preference_accuracy(chosen - rejected)}
    mask = mask.bool()
    n = mask.sum().clamp_min(1)
    m["weights/mean"] = (out.weights * mask).sum() / n
    for part in ("preference", "contrastive", "reward_enhancement"):
        if getattr(out, part) is not None:
            m[f"loss/{part}"] = getattr(out, part).mean()
    if out.similarity is not None:
        S = out.similarity
        a2, b2 = torch.cat([a, a])[:, None], torch.cat([b, b])[:, None]
        m["a"], m["b"] = a.mean(), b.mean()
        m["tokens/ambiguous"] = ((S > a2) & mask).sum() / n
        m["tokens/key"] = ((S < b2) & mask).sum() / n
        m["tokens/transitional"] = 1 - m["tokens/ambiguous"] - m["tokens/key"]
    return {k: v.detach().float() for k, v in m.items()}
