"""AAO (Ambiguity Awareness Optimization, arXiv 2511.23391) and the baselines it is compared with.

Read top to bottom, this file is the method:
  DPO and its relatives (Eq. 2; KTO and TDPO among them) on sequence log-probs
  -> token similarity (Eq. 7)
  -> thresholds a, b from the logits (Eq. 8) -> token weights (Eq. 14-17; or DPO-Random's, or
  TIS-DPO's from contrastive models) -> weighted log-ratios
  -> auxiliary losses (Eq. 9-13) -> MixDPO routing -> the whole objective -> metrics.
Every function takes tensors and imports only torch. Per-token tensors are (pairs*2, K): the chosen
answers in the first half, the rejected in the second, K positions aligned with the predicted token;
`mask` marks answer tokens (prompt and padding are 0). The per-token log-probs themselves (Eq. 1)
come from model.py's chunked head, which never builds the (rows, K, vocab) logits; TDPO's
per-token KLs from its SequentialKL beside it, in the same blocks.
Where a printed equation is ambiguous or wrong, the comment says what is printed, what is done, why.
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


# ----------------------------------------------------------------------------- Eq. 2: DPO family
# Each loss takes one score per answer, (B,) each, and returns a per-pair loss (B,). For the
# reference-based losses the score is the answer's (weighted) log-ratio log π_θ(y)/π_ref(y); beta is
# a float or a (B,) tensor (SP2DPO's per-pair β). The conventions are their authors' and TRL 1.16's.


def dpo_loss(chosen_logratios, rejected_logratios, beta):
    """Eq. 2: -log σ(β[log π_θ(y_w)/π_ref(y_w) - log π_θ(y_l)/π_ref(y_l)])."""
    return -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))


def cdpo_loss(chosen_logratios, rejected_logratios, beta, label_smoothing=0.1):
    """cDPO (Mitchell 2023, "A note on DPO with noisy preferences"): the DPO loss against a label
    flipped with probability ε, -(1-ε) log σ(βh) - ε log σ(-βh). Not TRL's `robust`, which is rDPO
    (Chowdhury et al. 2024): the flipped term subtracted instead, the whole divided by 1 - 2ε."""
    h = beta * (chosen_logratios - rejected_logratios)
    return -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)


def ipo_loss(chosen_logratios, rejected_logratios, beta):
    """IPO (Azar et al. 2024, their Eq. 17): regress the margin onto 1/(2β) instead of pushing it to
    infinity. The objective feeds it per-token mean log-ratios (TRL's form, which the IPO authors
    confirmed their results used): squared, a summed margin would grow with the answers' length."""
    return (chosen_logratios - rejected_logratios - 1 / (2 * beta)) ** 2


def hinge_loss(chosen_logratios, rejected_logratios, beta):
    """The hinge of RSO (Liu et al. 2023) and TRL, max(0, 1 - βh) on the reference-normalized
    margin h. SLiC-HF's hinge is on the raw log-prob difference, without a reference."""
    return F.relu(1 - beta * (chosen_logratios - rejected_logratios))


def simpo_loss(chosen_mean_logps, rejected_mean_logps, beta, gamma):
    """SimPO (Meng et al. 2024): reference-free, on per-token mean log-probs, with a target
    margin γ: -log σ(β(mean log π(y_w) - mean log π(y_l)) - γ). Its recipes give γ as a share of β
    (γ = β·ratio)."""
    return -F.logsigmoid(beta * (chosen_mean_logps - rejected_mean_logps) - gamma)


def sft_loss(logps, mask, n_tokens):
    """The SFT stage's loss: the answer tokens' summed NLL over n_tokens, the answer tokens of the
    whole global batch, so that micro-batches and processes add up to TRL's token mean."""
    return -(logps * mask).sum() / n_tokens


def kto_loss(
    chosen_logratios, rejected_logratios, kl, beta, desirable_weight=1.0, undesirable_weight=1.0
):
    """KTO (Ethayarajh et al. 2024, arXiv 2402.01306; its loss L_KTO = E[λ_y - v(x, y)], TRL's
    "Eqn (7)"), trained from pairs as TRL trains it: each pair gives a desirable example (x, y_w)
    and an undesirable one (x, y_l), valued against the reference point z_0 = kl, the detached KL
    estimate kto_reference_point makes from mismatched answers:
    λ_D (1 - σ(β(r_w - z_0))) and λ_U (1 - σ(β(z_0 - r_l))), r = log π_θ(y)/π_ref(y).
    TRL averages over the 2B examples of a batch; the pair's loss is the mean of its two examples,
    so that the mean over pairs is TRL's."""
    chosen = desirable_weight * (1 - torch.sigmoid(beta * (chosen_logratios - kl)))
    rejected = undesirable_weight * (1 - torch.sigmoid(beta * (kl - rejected_logratios)))
    return (chosen + rejected) / 2


def kto_reference_point(mismatched_logratios, mask):
    """KTO's z_0 = KL(π_θ(y'|x) || π_ref(y'|x)), estimated as TRL does: the mean over a
    micro-batch's mismatched (prompt, answer) examples of their summed log-ratio (each prompt with
    the previous pair's answers, data.mismatched_pairs), detached. The mean over processes and the
    clamp at 0 follow in the trainer (TRL clamps after gathering). (2B, K) each -> 0-dim."""
    return (mismatched_logratios * mask).sum(-1).mean().detach()


def tdpo_loss(chosen_logratios, rejected_logratios, chosen_kl, rejected_kl, beta, alpha, variant):
    """TDPO (Zeng et al. 2024, arXiv 2404.11999): DPO's u = β(r_w - r_l) minus δ, the difference of
    the two answers' sequential forward KLs D_SeqKL(x, y) = Σ_t KL(π_ref(·|x, y<t) || π_θ(·|x, y<t))
    (model.SequentialKL), as their code computes the logit of the sigmoid:
    TDPO1  -log σ(u - δ),    δ = β D_SeqKL(x, y_l) - β D_SeqKL(x, y_w);
    TDPO2  -log σ(u - α δ₂), δ₂ = β D_SeqKL(x, y_l) - sg(β D_SeqKL(x, y_w)): the chosen side's
    KL detached, scaled by α (their default 0.5). (B,) each -> (B,)."""
    margin = chosen_logratios - rejected_logratios
    if variant == 1:
        return -F.logsigmoid(beta * (margin + chosen_kl - rejected_kl))
    return -F.logsigmoid(beta * (margin + alpha * (chosen_kl.detach() - rejected_kl)))


PAIR_LOSSES = {"dpo": dpo_loss, "ipo": ipo_loss, "cdpo": cdpo_loss, "hinge": hinge_loss}
TDPO_VARIANTS = {"tdpo1": 1, "tdpo2": 2}
# β by loss: TRL's defaults; SimPO's recipes; TDPO's code (config/loss/tdpo.yaml)
DEFAULT_BETA = {
    "dpo": 0.1,
    "ipo": 0.1,
    "cdpo": 0.1,
    "hinge": 0.1,
    "simpo": 2.0,
    "kto": 0.1,
    "tdpo1": 0.1,
    "tdpo2": 0.1,
}


# ----------------------------------------------------------------------------- Eq. 7: similarity


@torch.no_grad()
def token_similarity(emb_w, emb_l, mask_w, mask_l):
    """Eq. 7: S of an answer token = its highest normalized cosine similarity to the other answer.

    emb_w (B, Kw, D), emb_l (B, Kl, D): input embeddings of the answer tokens; masks (B, K),
    1 = answer token. Printed, Eq. 7 min-max normalizes each row and then takes that row's max,
    which is always exactly 1. The text says "min-max normalization over all cross-answer token
    similarities": normalize with the min and max of the pair's whole masked matrix, then
    S_w[i] = max_j Cn[i, j], S_l[j] = max_i Cn[i, j]. Padded positions never enter a min, a max or
    a score (their S is 0). Detached: S is an input. One pair without the batch dimension,
    (K, D) and (K,), works too.
    """
    if emb_w.dim() == 2:
        batched = token_similarity(emb_w[None], emb_l[None], mask_w[None], mask_l[None])
        return tuple(S[0] for S in batched)
    dtype = torch.promote_types(emb_w.dtype, torch.float32)
    unit_w = F.normalize(emb_w.to(dtype), dim=-1)
    unit_l = F.normalize(emb_l.to(dtype), dim=-1)
    C = unit_w @ unit_l.transpose(1, 2)  # (B, Kw, Kl)
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
    """AW's input: the policy's logits, detached, mean-pooled over the answer tokens of both answers
    of a pair: one (a, b) per pair, since Eq. 16 gives a and b no token index. logit_sums (2B, V)
    are each row's logits summed over its answer tokens (model.AnswerStates.logit_sums);
    mask (2B, K). -> (B, V) fp32."""
    chosen, rejected = split_pairs(logit_sums.detach().float())
    n_chosen, n_rejected = split_pairs(mask.float().sum(1))
    return (chosen + rejected) / (n_chosen + n_rejected).clamp_min(1)[:, None]


class VocabLinear(torch.autograd.Function):
    """x Wᵀ for the threshold MLP's vocab-wide first layer. Its weight gradient (a few pooled rows
    times the vocabulary: 512 x 128,256 for Llama 3, 250 MiB) is added into W.grad in place, not
    returned as a new tensor for autograd to accumulate: on the CPU a fresh 250 MiB block each step
    costs more in page faults than the product itself. Keep W.grad between steps (zero it, do not
    free it)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x)
        ctx.weight = weight  # the Parameter itself, whose .grad receives the product
        return x @ weight.T

    @staticmethod
    def backward(ctx, grad_out):
        (x,), weight = ctx.saved_tensors, ctx.weight
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        weight.grad.addmm_(grad_out.T.to(x.dtype), x)
        return (grad_out @ weight if ctx.needs_input_grad[0] else None), None


class ThresholdMLP(nn.Module):
    """Eq. 8: a, b = AW(P(y | x, θ)), with 1 > a > b > 0 for any finite input.

    Sized as the paper reports: on a 32,000 vocabulary, vocab x 512 fp32 weights are 62.50 MiB
    (fc1 has no bias: its input is centred per pair). The paper "clips" to keep a > b; clipping has
    no gradient, so a differentiable map does it: b = σ(u), a = b + (1 - b)·σ(v), with u, v kept
    inside (-4, 4) by a soft bound so that a - b never rounds to 0. The input is standardized
    first: logits carry an arbitrary shift (softmax ignores it) and a scale that grows in training;
    neither should move a, b. The last layer starts at zero weights with biases giving a = 0.8,
    b = 0.4: moderate thresholds.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden: int = 512,
        init_a: float = 0.8,
        init_b: float = 0.4,
        bound: float = 4.0,
    ):
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
        # fp32 in training: the MLP is never cast to bf16
        x = pooled_logits.to(self.fc1.weight.dtype)
        x = x / x.abs().amax(-1, keepdim=True).clamp_min(1e-30)  # into [-1, 1]: no overflow below
        x = F.layer_norm(x, x.shape[-1:])
        h = F.gelu(VocabLinear.apply(x, self.fc1.weight))
        u, v = (self.bound * torch.tanh(self.fc2(h) / self.bound)).unbind(-1)
        b = torch.sigmoid(u)
        a = b + (1 - b) * torch.sigmoid(v)
        return a, b


# ----------------------------------------------------------------------------- Eq. 14-17: weights


def aao_weights(S: torch.Tensor, a, b, alpha: float = 200.0) -> torch.Tensor:
    """Eq. 17, the smooth form of Eq. 16 that lets the loss reach a and b:
    w = (1-S)²·σ(α(S-a)) + (1+S)·σ(α(b-S)) + 1 - σ(α(S-a)) - σ(α(b-S)).
    Ambiguous tokens (S > a) get Eq. 14's (1-S)², key tokens (S < b) Eq. 15's 1+S, transitional
    ones 1. (Eq. 16 as printed reads "a < S < b" for the middle case; with a > b that is b < S < a.)
    S (B, K); a, b floats or (B,) tensors, one pair each."""
    a = torch.as_tensor(a, dtype=S.dtype, device=S.device)
    b = torch.as_tensor(b, dtype=S.dtype, device=S.device)
    if a.dim() == 1:
        a, b = a[:, None], b[:, None]
    ambiguous = torch.sigmoid(alpha * (S - a))
    key = torch.sigmoid(alpha * (b - S))
    return (1 - S) ** 2 * ambiguous + (1 + S) * key + 1 - ambiguous - key


def random_weights(mask: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """DPO-Random (Table 2): i.i.d. U(0, 2) token weights. Mean 1, so the total weight matches plain
    DPO in expectation, and the range is that of AAO's weights: only *which* tokens count differs.
    One seed per row: a row gets the same weights whatever the batch or the number of processes."""
    rows = [torch.rand(mask.shape[1], generator=torch.Generator().manual_seed(s)) for s in seeds]
    return torch.stack(rows).to(mask.device) * 2


def random_weight_seeds(seed: int, step: int, pairs: list) -> list[int]:
    """Seeds of the random token weights: one per (step, pair, answer), whatever the batching."""
    base = (seed * 1_000_003 + step) * 2**21
    return [base + 2 * i for i in pairs] + [base + 2 * i + 1 for i in pairs]


# ----------------------------------------------------------------------------- TIS-DPO's weights


def tis_dpo_weights(reward, mu: float = 1.0, k: float = 1.0, lower=-0.5, upper=1.5):
    """TIS-DPO (Liu et al. 2024, arXiv 2410.04350), a token-level baseline of Table 2: importance
    weights estimated by a pair of contrastive models instead of AAO's similarity.

    reward (2B, K): r_t = log π+(y_t | x, y_<t) - log π-(y_t | x, y_<t), the positive model's
    log-prob of each answer token minus the negative model's: their estimate of the token's reward,
    up to scale. A token weighs w_t = k·exp(μ·clamp(±r_t, L, U)), + on the chosen answer, - on the
    rejected one: a token counts more the more it speaks for its side of the pair. The clamp comes
    after the sign, so that both answers' weights lie in [k·e^(μL), k·e^(μU)] (clamped before it,
    the rejected answer's would lie in [k·e^(-μU), k·e^(-μL)]). The weights are constants (frozen
    models whose log-probs train.py's cache_contrastive computes once): the loss is DPO on
    Σ_t w_t log π_θ/π_ref(y_t) per answer, as the authors' released trainer computes it (its
    extra token-level KL term is off there by default)."""
    sign = torch.ones_like(reward[:, :1])
    sign[reward.shape[0] // 2 :] = -1  # the rejected rows
    return k * torch.exp(mu * (sign * reward).clamp(lower, upper))


def weighted_sequence_logps(
    logps: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Σ_t w_t log π(y_t) over answer tokens: Eq. 4's sum with each token's factor weighted.
    With the same weights for policy and reference, it gives the weighted log-ratio
    Σ_t w_t (log π_θ - log π_ref)."""
    return (logps * weights * mask).sum(-1)


# ----------------------------------------------------------------------------- Eq. 9-13: aux losses


def contrastive_suppression_loss(hidden_w, hidden_l, weights_w, weights_l, mask_w, mask_l):
    """Eq. 9-10: L_contrastive = S_pref + S_dis, the weighted mean cosine between the answers.

    Printed, the cosine is taken of E_i·w_i and E_j·w_j; the cosine ignores positive scales, so the
    loss could not reach the weights. Read as Σ_i Σ_j w_i w_j cos(h_w,i, h_l,j) / (T_p·T_d), with h
    the policy's final (normed) hidden states. S_dis is the same double sum in the other order,
    hence equal to S_pref. The double sum factorizes,
    Σ_i Σ_j w_i w_j (ĥ_i · ĥ_j) = (Σ_i w_i ĥ_i) · (Σ_j w_j ĥ_j) with ĥ = h/|h|:
    O(K·D) work instead of a K_w x K_l matrix. Returns (B,)."""
    # bf16 hidden states: cosines in fp32
    dtype = torch.promote_types(hidden_w.dtype, torch.float32)
    ww, wl = (weights_w * mask_w).to(dtype), (weights_l * mask_l).to(dtype)
    sum_w = torch.einsum("bi,bid->bd", ww, F.normalize(hidden_w.to(dtype), dim=-1))  # (B, D)
    sum_l = torch.einsum("bj,bjd->bd", wl, F.normalize(hidden_l.to(dtype), dim=-1))
    s_pref = (sum_w * sum_l).sum(-1) / (mask_w.sum(1) * mask_l.sum(1)).clamp_min(1)
    s_dis = s_pref  # Eq. 9's second line: cos is symmetric
    return s_pref + s_dis


def reward_enhancement_loss(chosen_logps, weights, mask, form: str = "weighted_mean"):
    """Eq. 11-12: L_reward = -E[R_chosen], R_chosen the chosen answer's log-likelihood.

    Printed, Eq. 11 is the unweighted sum Σ_t log π(y_t) ("printed"). The text says the weighting
    applies to it, so the default is Σ_t w_t log π(y_t) / Σ_t w_t ("weighted_mean": a raw sum over
    hundreds of tokens would dwarf the DPO loss); the weighted raw sum is a third form
    ("weighted_sum"). Weighted, this term also trains a and b through w, a gradient path the paper
    does not describe. Returns (B,)."""
    if form == "printed":
        return -(chosen_logps * mask).sum(-1)
    reward = (chosen_logps * weights * mask).sum(-1)
    if form == "weighted_mean":
        reward = reward / (weights * mask).sum(-1).clamp_min(1e-6)
    return -reward


def total_loss(preference, contrastive, reward, lambda_c: float = 1.0, lambda_r: float = 1.0):
    """Eq. 13 added to the preference loss: L = L_DPO + λ_c·L_contrastive + λ_r·L_reward."""
    return preference + lambda_c * contrastive + lambda_r * reward


# ----------------------------------------------------------------------------- MixDPO and SP2DPO


def mixdpo_routed(margin: torch.Tensor, tau: float) -> torch.Tensor:
    """MixDPO: pairs whose data margin (score_chosen - score_rejected) is below τ are too hard for a
    preference loss but still teach through SFT on their chosen answer. A pair without a margin
    (NaN) is never routed. Returns (N,) bool."""
    return margin < tau


def mixdpo_hardest(margins: torch.Tensor, q: float, seed: int) -> torch.Tensor:
    """MixDPO's τ given as a share: exactly round(q·N) of the N pairs, those of smallest margin,
    take SFT. Margins tie often (UltraFeedback's scores are discrete): a τ at the q-quantile
    compared with `<` routes none of the pairs tied at it (q = 0.3 of margins half tied at the
    minimum: 0%), `<=` all of them. Ties are broken by a seeded shuffle, as the curriculum
    breaks them. Pairs without a margin (NaN) sort last. margins (N,) -> (N,) bool."""
    shuffled = torch.randperm(len(margins), generator=torch.Generator().manual_seed(seed))
    # by margin, hardest first; the stable sort keeps tied pairs in their shuffled order
    ranked = shuffled[torch.sort(margins[shuffled], stable=True).indices]
    routed = torch.zeros(len(margins), dtype=torch.bool)
    routed[ranked[: math.floor(q * len(margins) + 0.5)]] = True
    return routed


def per_pair_beta(
    column: torch.Tensor, scale: float = 1.0, lo: float | None = None, hi: float | None = None
):
    """SP2DPO: β_i from a column of the data, times a base scale and clipped to [lo, hi]. The
    column's β were fitted for one loss and one model; the scale moves them to another, the clip
    keeps outliers sane."""
    beta = column * scale
    return beta if lo is None and hi is None else beta.clamp(min=lo, max=hi)


# ----------------------------------------------------------------------------- beyond the paper
# This project's research, not the paper's method: other readings of Eq. 7's S (--similarity
# hidden, alignment) and of the end-of-answer token (--end-token-weight). The defaults are the
# paper's; docs/toy-replica.md and docs/real-model-replica.md say what each reading measured.


def lcs_table(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """P[:, i, j] = length of the longest common subsequence of x[:, :i] and y[:, :j].

    x (B, Kx), y (B, Ky) token ids, padding given values that match nothing. The textbook DP, one
    row of x at a time: the row max(P[i, j], P[i, j-1] + [x_i = y_j]) is made monotone in j by a
    running max, which is the DP's third case (P[i+1, j-1]) unrolled. -> (B, Kx+1, Ky+1), int32."""
    equal = (x[:, :, None] == y[:, None, :]).to(torch.int32)  # (B, Kx, Ky)
    rows = [torch.zeros(x.shape[0], y.shape[1] + 1, dtype=torch.int32, device=x.device)]
    for i in range(x.shape[1]):
        prev = rows[-1]
        best = torch.maximum(prev[:, 1:], prev[:, :-1] + equal[:, i]).cummax(dim=1).values
        rows.append(F.pad(best, (1, 0)))
    return torch.stack(rows, dim=1)


def in_every_lcs(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, Kx) bool: x's token i is matched in *every* longest common subsequence of x and y, i.e.
    some common subsequence skipping it is shorter. It is skipped by a longest one iff for some j
    the prefix LCS(x[:i], y[:j]) and the suffix LCS(x[i+1:], y[j:]) add up to the whole LCS.
    O(Kx·Ky)."""
    prefix = lcs_table(x, y)
    suffix = lcs_table(x.flip(1), y.flip(1)).flip(1, 2)  # suffix[:, i, j] = LCS(x[:, i:], y[:, j:])
    total = prefix[:, -1, -1]
    # (B, Kx): the best LCS that skips x_i
    skipping = (prefix[:, :-1, :] + suffix[:, 1:, :]).amax(dim=2)
    return skipping < total[:, None]


@torch.no_grad()
def alignment_similarity(ids_w, ids_l, mask_w, mask_l, S_w, S_l, cap: float = 0.5):
    """The position-aware reading of Eq. 7 (--similarity alignment; not the paper's).

    A token is ambiguous, S = 1, when every longest common subsequence of the two answers' token ids
    matches it: it sits at the same place in the order of both answers. Any other token keeps
    Eq. 7's embedding score S_w, S_l, capped at `cap`: a token that also occurs elsewhere in the
    other answer (a reordered list, "A beat B" against "B beat A") is then never ambiguous at the
    initial a = 0.8, and stays weighted. Requiring every LCS, not some, makes the reading
    independent of how ties between alignments break. ids (B, K) with masks (B, K); non-answer
    positions are replaced by values that match nothing."""
    x = torch.where(mask_w.bool(), ids_w, -1)
    y = torch.where(mask_l.bool(), ids_l, -2)
    # Only the columns that hold answer tokens enter the DP (a host sync; not the default option).
    cols = (mask_w.bool() | mask_l.bool()).any(0).nonzero().flatten()
    lo, hi = (int(cols[0]), int(cols[-1]) + 1) if cols.numel() else (0, 0)
    aligned_w = torch.zeros_like(mask_w, dtype=torch.bool)
    aligned_l = torch.zeros_like(mask_l, dtype=torch.bool)
    aligned_w[:, lo:hi] = in_every_lcs(x[:, lo:hi], y[:, lo:hi])
    aligned_l[:, lo:hi] = in_every_lcs(y[:, lo:hi], x[:, lo:hi])
    S_w = torch.where(aligned_w & mask_w.bool(), 1.0, S_w.clamp(max=cap))
    S_l = torch.where(aligned_l & mask_l.bool(), 1.0, S_l.clamp(max=cap))
    return S_w, S_l


SIMILARITIES = ("embedding", "hidden", "alignment")


def token_similarities(similarity: str, mask, embeds, hidden_after=None, ids=None):
    """S of every answer token, (2B, K), by one of three readings of Eq. 7:
    embedding  the paper's: normalized max-cosine of the input embeddings, blind to position and
               context;
    hidden     the same on the policy's final hidden state after reading the token (detached),
               which knows what came before it: "A" opening "A beat B" is not "A" closing
               "B beat A";
    alignment  Eq. 7's embedding score, but S = 1 exactly for the tokens that every longest common
               subsequence of the two answers matches, capped below for the rest
               (alignment_similarity)."""
    mask_w, mask_l = split_pairs(mask)
    source = hidden_after if similarity == "hidden" else embeds
    S_w, S_l = token_similarity(*split_pairs(source.detach()), mask_w, mask_l)
    if similarity == "alignment":
        S_w, S_l = alignment_similarity(*split_pairs(ids), mask_w, mask_l, S_w, S_l)
    return torch.cat([S_w, S_l]).to(mask.dtype)


def last_answer_token(mask: torch.Tensor) -> torch.Tensor:
    """(2B, K) bool: each answer's last token, the end-of-answer token unless the answer was
    truncated. Both answers end with it, so under Eq. 7 its S is 1 and its weight ~0
    (--end-token-weight)."""
    mask = mask.bool()
    return mask & (mask.cumsum(-1) == mask.sum(-1, keepdim=True))


# ----------------------------------------------------------------------------- the whole objective


@dataclass
class Objective:
    # dpo | ipo | cdpo | hinge | simpo | kto | tdpo1 | tdpo2 (the SFT stage: sft_loss)
    loss: str = "dpo"
    weighting: str = "aao"  # none | random | aao | tis (TIS-DPO's contrastive estimate)
    beta: float | None = None  # None: the loss's own (DEFAULT_BETA)
    label_smoothing: float = 0.1  # cdpo's ε
    simpo_gamma_beta_ratio: float = 0.5  # SimPO's γ/β: its Llama-3 base recipe (β 2.0, γ 1.0)
    # IPO on per-token mean log-ratios (TRL, the IPO authors); False: summed
    ipo_normalized: bool = True
    desirable_weight: float = 1.0  # KTO's λ_D and λ_U (TRL's defaults)
    undesirable_weight: float = 1.0
    tdpo_alpha: float = 0.5  # TDPO2's α (their code's default)
    alpha: float = 200.0  # Eq. 17
    lambda_c: float = 1.0  # Eq. 13; the paper gives no values
    lambda_r: float = 1.0
    reward_form: str = "weighted_mean"  # Eq. 11: weighted_mean | weighted_sum | printed
    # Eq. 7 on: embedding (the paper's) | hidden | alignment (see token_similarities)
    similarity: str = "embedding"
    # the answer's last token: aao (its Eq. 17 weight) | one (weight 1)
    end_token_weight: str = "aao"
    sft_weight: float = 1.0  # MixDPO: the routed pairs' SFT loss is multiplied by this
    tis_mu: float = 1.0  # TIS-DPO's w = k·exp(μ·clamp(±r, L, U)) (tis_dpo_weights)
    tis_k: float = 1.0
    tis_bounds: tuple = (-0.5, 1.5)  # (L, U)

    def __post_init__(self):
        if self.loss not in DEFAULT_BETA:
            hint = ": the SFT stage has no pairwise loss (aao.sft_loss)"
            raise ValueError(f"unknown loss {self.loss!r}" + (hint if self.loss == "sft" else ""))
        if self.weighting not in ("none", "random", "aao", "tis"):
            raise ValueError(f"unknown weighting {self.weighting!r}")
        if not self.tis_bounds[0] < self.tis_bounds[1]:
            raise ValueError(f"TIS-DPO's bounds need L < U, got {self.tis_bounds}")
        if self.reward_form not in ("weighted_mean", "weighted_sum", "printed"):
            raise ValueError(f"unknown reward_form {self.reward_form!r}")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"unknown similarity {self.similarity!r}")
        if self.end_token_weight not in ("aao", "one"):
            raise ValueError(f"unknown end_token_weight {self.end_token_weight!r}")
        self.beta = DEFAULT_BETA[self.loss] if self.beta is None else self.beta


def token_weights(
    obj: Objective, mask, embeds=None, a=None, b=None, seeds=None, hidden_after=None, ids=None
):
    """The weighting, orthogonal to the loss. -> (weights, S), both (2B, K); S None unless aao.
    (tis: preference_objective reads the contrastive models' estimate, PairBatch.tis_reward.)"""
    if obj.weighting == "none":
        return torch.ones_like(mask), None
    if obj.weighting == "random":
        return random_weights(mask, seeds), None
    S = token_similarities(obj.similarity, mask, embeds, hidden_after, ids)
    weights = aao_weights(S, torch.cat([a, a]), torch.cat([b, b]), obj.alpha)
    # the pair cannot say when to stop: let the end token count like plain DPO
    if obj.end_token_weight == "one":
        weights = torch.where(last_answer_token(mask), 1.0, weights)
    return weights, S


def weighted_mean_logps(logps, weights, mask):
    """Σ w log π / Σ w per answer (SimPO's score under a weighting). An answer whose every token is
    ambiguous has Σ w ≈ 0: the quotient is then 0/0, and near it a reward of ~0, the best SimPO
    knows, for the answer the pair says nothing about. There the plain per-token mean is used."""
    weighted = weighted_sequence_logps(logps, weights, mask)
    total, n = (weights * mask).sum(-1), mask.sum(-1).clamp_min(1)
    informative = total >= 1e-3 * n
    plain_mean = (logps * mask).sum(-1) / n
    return torch.where(informative, weighted / torch.where(informative, total, 1.0), plain_mean)


@dataclass
class ObjectiveOutput:
    """A batch's per-pair losses and what the metrics and weights page read; (B,) unless said."""

    # what is minimized: the pairwise loss (or a routed pair's SFT loss) + Eq. 13's terms
    losses: torch.Tensor
    preference: torch.Tensor  # the pairwise loss alone (Eq. 2 or a relative)
    # TRL's: β x the plain (unweighted) log-ratio; SimPO: β x mean log-prob
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor  # summed answer log-probs of the policy
    rejected_logps: torch.Tensor
    weights: torch.Tensor  # (2B, K) token weights; 1 without weighting
    # β x the score the loss saw, under a weighting
    weighted_chosen_rewards: torch.Tensor | None = None
    weighted_rejected_rewards: torch.Tensor | None = None
    similarity: torch.Tensor | None = None  # (2B, K) S of Eq. 7, aao only
    a: torch.Tensor | None = None  # Eq. 8's thresholds, aao only
    b: torch.Tensor | None = None
    contrastive: torch.Tensor | None = None  # Eq. 9-10, aao only
    reward_enhancement: torch.Tensor | None = None  # Eq. 11-12, aao only
    routed: torch.Tensor | None = None  # bool: MixDPO sent the pair to SFT
    beta: torch.Tensor | float = 0.0  # the β used, per pair under SP2DPO
    kl: torch.Tensor | None = None  # 0-dim: KTO's reference point z_0
    # (B,) each: TDPO's sequential KLs D_SeqKL(x, y_w), D_SeqKL(x, y_l)
    chosen_kl: torch.Tensor | None = None
    rejected_kl: torch.Tensor | None = None


@dataclass
class PairBatch:
    """A micro-batch as the objective reads it, beside the models' states: the (2B, K) answer
    grid (the B chosen answers, then the B rejected ones), and what neighbouring methods add."""

    mask: torch.Tensor  # (2B, K): 1 on answer tokens
    ids: torch.Tensor | None = None  # (2B, K) answer token ids: --similarity alignment reads them
    beta: torch.Tensor | float | None = None  # (B,) SP2DPO's per-pair β; None: the objective's own
    routed: torch.Tensor | None = None  # (B,) bool: the pairs MixDPO sends to SFT (per data set)
    seeds: list | None = None  # 2B ints: DPO-Random's per-answer seeds
    # (2B, K) TIS-DPO: log π+ - log π- of each answer token, from the contrastive models
    tis_reward: torch.Tensor | None = None
    kto_kl: torch.Tensor | None = None  # 0-dim: KTO's reference point z_0 (kto_reference_point)


def auxiliary_losses(obj: Objective, policy, weights, mask, kept):
    """Eq. 9-12 on a micro-batch: (contrastive, reward enhancement), each (B,), times kept (0 for a
    pair MixDPO routed to SFT: routed pairs take no part in the auxiliary losses)."""
    (w_w, w_l), (m_w, m_l) = split_pairs(weights), split_pairs(mask)
    hidden_w, hidden_l = split_pairs(policy.hidden)
    contrastive = kept * contrastive_suppression_loss(hidden_w, hidden_l, w_w, w_l, m_w, m_l)
    chosen_logps = split_pairs(policy.logps)[0]
    reward = kept * reward_enhancement_loss(chosen_logps, w_w, m_w, obj.reward_form)
    return contrastive, reward


def reference_based_preference(obj: Objective, ratios, weights, mask, batch: PairBatch, beta, kl):
    """The pairwise losses on log-ratios (B,) and the scores they saw: each answer's weighted
    log-ratio Σ_t w_t (log π_θ - log π_ref); KTO values each answer against z_0 (batch.kto_kl);
    TDPO adds the sequential KLs kl (2B, K) of model.SequentialKL, unweighted: the token weights
    reweigh the sampled tokens' log-ratios, not the KL of whole distributions."""
    score_c, score_r = split_pairs(weighted_sequence_logps(ratios, weights, mask))
    if obj.loss == "ipo" and obj.ipo_normalized:  # per token: Σ w under a weighting, else count
        length_c, length_r = split_pairs((weights * mask).sum(-1).clamp_min(1e-6))
        score_c, score_r = score_c / length_c, score_r / length_r
    if obj.loss == "kto":
        extra = (obj.desirable_weight, obj.undesirable_weight)
        return kto_loss(score_c, score_r, batch.kto_kl, beta, *extra), score_c, score_r
    if obj.loss in TDPO_VARIANTS:
        kl_c, kl_r = split_pairs((kl * mask).sum(-1))
        variant = TDPO_VARIANTS[obj.loss]
        return (
            tdpo_loss(score_c, score_r, kl_c, kl_r, beta, obj.tdpo_alpha, variant),
            score_c,
            score_r,
        )
    extra = {"label_smoothing": obj.label_smoothing} if obj.loss == "cdpo" else {}
    return PAIR_LOSSES[obj.loss](score_c, score_r, beta, **extra), score_c, score_r


def add_sequential_kl(out: ObjectiveOutput, kl, mask, beta) -> None:
    """TDPO's rewards as their code logs them: β (log-ratio + sequential KL), detached; and each
    answer's sequential KL for the kl/* metrics."""
    out.chosen_kl, out.rejected_kl = split_pairs((kl * mask).sum(-1).detach())
    out.chosen_rewards = out.chosen_rewards + beta * out.chosen_kl
    out.rejected_rewards = out.rejected_rewards + beta * out.rejected_kl


def preference_objective(
    obj: Objective, policy, reference, batch: PairBatch, a=None, b=None
) -> ObjectiveOutput:
    """The per-pair losses of a micro-batch and what the metrics need.

    policy: the policy's answer states (model.AnswerStates): logps (2B, K), and for aao embeds and
    hidden (2B, K, D), hidden_after for --similarity hidden, for TDPO kl (2B, K). reference: the
    frozen reference's states (its logps), None for SimPO. a, b: (B,) thresholds from
    ThresholdMLP (aao only). The token weights multiply the per-token log-*ratios*: policy and
    reference alike."""
    beta = obj.beta if batch.beta is None else batch.beta
    mask = batch.mask.to(policy.logps.dtype)
    if obj.weighting == "tis":
        weights, S = tis_dpo_weights(batch.tis_reward, obj.tis_mu, obj.tis_k, *obj.tis_bounds), None
    else:
        weights, S = token_weights(
            obj, mask, policy.embeds, a, b, batch.seeds, policy.hidden_after, batch.ids
        )
    plain_c, plain_r = split_pairs((policy.logps * mask).sum(-1))
    if obj.loss == "simpo":  # reference-free: per-token mean log-probs
        score_c, score_r = split_pairs(weighted_mean_logps(policy.logps, weights, mask))
        preference = simpo_loss(score_c, score_r, beta, beta * obj.simpo_gamma_beta_ratio)
        n_c, n_r = split_pairs(mask.sum(-1).clamp_min(1))
        rewards = beta * plain_c / n_c, beta * plain_r / n_r
    else:
        ratios = policy.logps - reference.logps
        preference, score_c, score_r = reference_based_preference(
            obj, ratios, weights, mask, batch, beta, policy.kl
        )
        rewards = tuple(beta * x for x in split_pairs((ratios * mask).sum(-1)))
    out = ObjectiveOutput(
        losses=preference,
        preference=preference,
        chosen_rewards=rewards[0],
        rejected_rewards=rewards[1],
        chosen_logps=plain_c,
        rejected_logps=plain_r,
        weights=weights,
        similarity=S,
        a=a,
        b=b,
        beta=beta,
        kl=batch.kto_kl if obj.loss == "kto" else None,
    )
    if obj.loss in TDPO_VARIANTS:
        add_sequential_kl(out, policy.kl, mask, beta)
    if obj.weighting != "none":
        out.weighted_chosen_rewards, out.weighted_rejected_rewards = beta * score_c, beta * score_r
    kept = torch.ones_like(preference)
    if batch.routed is not None:
        out.routed = batch.routed.bool()
        chosen_nll = -plain_c / split_pairs(mask.sum(-1).clamp_min(1))[0]
        out.losses = torch.where(out.routed, obj.sft_weight * chosen_nll, preference)
        kept = (~out.routed).to(preference.dtype)
    if obj.weighting == "aao":
        out.contrastive, out.reward_enhancement = auxiliary_losses(obj, policy, weights, mask, kept)
        out.losses = total_loss(
            out.losses, out.contrastive, out.reward_enhancement, obj.lambda_c, obj.lambda_r
        )
    return out


# ----------------------------------------------------------------------------- metrics


def preference_accuracy(margin: torch.Tensor) -> torch.Tensor:
    """Share of pairs ranked right by an implicit reward; a tie (policy = reference, at step 0)
    counts half: an untrained policy scores 0.5 (the held-out yardstick; TRL's rewards/accuracies
    counts it 0)."""
    return ((margin > 0).float() + 0.5 * (margin == 0).float()).mean()


# Every key objective_metrics returns; the trainer logs them as they are (eval/ prefixed on held-out
# pairs).
METRICS = {
    "loss": "what is minimized, per pair: the pairwise loss, "
    "plus λ_c·contrastive + λ_r·reward enhancement (aao)",
    "loss/preference": "the pairwise loss alone (DPO's starts at log 2 = 0.693)",
    "loss/contrastive": "Eq. 9-10, the weighted mean cosine between the two answers' "
    "hidden states (aao)",
    "loss/reward_enhancement": "Eq. 11-12, minus the chosen answer's (weighted, mean) "
    "log-likelihood (aao)",
    "rewards/chosen": "TRL's: β x the chosen answer's plain log-ratio log π_θ/π_ref, "
    "summed over its tokens (SimPO: β x its mean log-prob; TDPO, as its code: β x (log-ratio + "
    "sequential KL)); unweighted, so every weighting is on one scale",
    "rewards/rejected": "the same for the rejected answer",
    "rewards/margins": "rewards/chosen - rewards/rejected",
    "rewards/accuracies": "share of pairs with rewards/chosen > rewards/rejected; "
    "a tie counts as wrong (TRL)",
    "weighted_rewards/chosen": "β x the score the loss saw: the weighted log-ratio "
    "(random, aao, tis weighting)",
    "weighted_rewards/rejected": "the same for the rejected answer",
    "weighted_rewards/margins": "their difference",
    "logps/chosen": "the policy's summed log-prob of the chosen answer "
    "(watch it for likelihood displacement)",
    "logps/rejected": "the same for the rejected answer",
    "weights/mean": "mean token weight over answer tokens (1 without weighting)",
    "a": "Eq. 8's upper threshold, mean over the pairs (aao)",
    "b": "Eq. 8's lower threshold, mean over the pairs (aao)",
    "tokens/ambiguous": "share of answer tokens with S > a (Eq. 14's (1-S)² weight) (aao)",
    "tokens/transitional": "share with b <= S <= a (weight 1) (aao)",
    "tokens/key": "share with S < b (Eq. 15's 1+S weight) (aao)",
    "kl": "KTO's reference point z_0 (TRL's kl): the policy's KL from the reference estimated "
    "on mismatched (prompt, answer) pairs, mean over processes, clamped at 0",
    "kl/chosen": "TDPO's sequential KL Σ_t KL(π_ref || π_θ) over the chosen answer's tokens "
    "(their code's kl/chosen)",
    "kl/rejected": "the same over the rejected answer",
    "kl/margin": "kl/chosen - kl/rejected",
    "mixdpo/routed": "share of pairs MixDPO sent to the SFT loss (--sft-below-margin/-quantile); "
    "under it loss/preference, loss/contrastive, loss/reward_enhancement, "
    "rewards/* and weighted_rewards/* are means over the other pairs",
}


# The metrics of the pairs the preference loss saw: under MixDPO, means over the pairs not routed.
KEPT_PAIR_METRICS = (
    "loss/preference",
    "loss/contrastive",
    "loss/reward_enhancement",
    "rewards/",
    "weighted_rewards/",
    "kl/",
)


@torch.no_grad()
def objective_metrics(out: ObjectiveOutput, mask, a=None, b=None) -> dict[str, torch.Tensor]:
    """Detached 0-dim tensors (no host sync here), means over the micro-batch: the keys of METRICS
    that apply. What describes the preference loss (KEPT_PAIR_METRICS: loss/preference,
    loss/contrastive, loss/reward_enhancement, rewards/*, weighted_rewards/*) is a mean over the
    pairs MixDPO did not route to SFT (0 when it routed all); mixdpo/routed, their share, weighs it
    when micro-batches are combined."""
    kept = torch.ones_like(out.chosen_rewards) if out.routed is None else (~out.routed).float()
    n_kept = kept.sum().clamp_min(1)
    mean = lambda x: (x * kept).sum() / n_kept
    m = {
        "loss": out.losses.mean(),
        "loss/preference": mean(out.preference),
        "rewards/chosen": mean(out.chosen_rewards),
        "rewards/rejected": mean(out.rejected_rewards),
        "rewards/margins": mean(out.chosen_rewards - out.rejected_rewards),
        "rewards/accuracies": mean((out.chosen_rewards > out.rejected_rewards).float()),
        "logps/chosen": out.chosen_logps.mean(),
        "logps/rejected": out.rejected_logps.mean(),
    }
    if out.weighted_chosen_rewards is not None:
        c, r = out.weighted_chosen_rewards, out.weighted_rejected_rewards
        m["weighted_rewards/chosen"], m["weighted_rewards/rejected"] = mean(c), mean(r)
        m["weighted_rewards/margins"] = mean(c - r)
    if out.routed is not None:
        m["mixdpo/routed"] = out.routed.float().mean()
    if out.kl is not None:
        m["kl"] = out.kl
    if out.chosen_kl is not None:
        m["kl/chosen"], m["kl/rejected"] = mean(out.chosen_kl), mean(out.rejected_kl)
        m["kl/margin"] = mean(out.chosen_kl - out.rejected_kl)
    mask = mask.bool()
    n = mask.sum().clamp_min(1)
    m["weights/mean"] = (out.weights * mask).sum() / n
    for part in ("contrastive", "reward_enhancement"):
        if getattr(out, part) is not None:
            m[f"loss/{part}"] = mean(getattr(out, part))
    if out.similarity is not None:
        S = out.similarity
        a2, b2 = torch.cat([a, a])[:, None], torch.cat([b, b])[:, None]
        m["a"], m["b"] = a.mean(), b.mean()
        m["tokens/ambiguous"] = ((S > a2) & mask).sum() / n
        m["tokens/key"] = ((S < b2) & mask).sum() / n
        m["tokens/transitional"] = 1 - m["tokens/ambiguous"] - m["tokens/key"]
    return {k: v.detach().float() for k, v in m.items()}


@torch.no_grad()
def squeeze_probe(top1, ref_top1, mask) -> dict[str, torch.Tensor]:
    """After Ren & Sutherland: the token-mean of max_v π(v | x, y_<t) at teacher-forced answer
    positions, on chosen and on rejected answers, for the policy and the reference. DPO's squeeze
    effect shows as the policy's top-1 probability falling below the reference's."""
    out = {}
    for name, lp in (("policy", top1), ("reference", ref_top1)):
        if lp is None:
            continue
        for side, logps, m in zip(("chosen", "rejected"), split_pairs(lp), split_pairs(mask)):
            n = m.sum().clamp_min(1)
            out[f"squeeze/{name}_{side}_top1"] = (logps.exp() * m).sum() / n
            out[f"squeeze/{name}_{side}_top1_logp"] = (logps * m).sum() / n
    return out
