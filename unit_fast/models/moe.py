"""MultiModel's sparsely gated mixture-of-experts feed-forward block (Kaiser et al. 2017, "One
Model To Learn Them All"; the layer of Shazeer et al. 2017, "Outrageously Large Neural
Networks"), as an option of UniT's transformer layers (``model.moe``).

``MoEFFN`` replaces a layer's ``linear2(dropout(act(linear1(x))))``: each token goes to the
``k`` experts (each an FFN ``d -> expert_ff -> d``) with the largest gate logits, and their
outputs are summed with the softmax of those ``k`` logits (Shazeer eq. 3-5).  The experts run
through ``unit_fast.ops.moe_dispatch`` (tokens sorted by expert, grouped matmuls; Triton on CUDA).
A layer with an ``MoEFFN`` has no ``linear1``/``linear2`` (its keys are ``<layer>.moe.*``) and no
dropout inside the FFN (the op fuses the activation; the residual dropout stays).

- Noisy top-k gating (Shazeer eq. 4): in training ``H(x) = x W_g + N(0, 1) (softplus(x W_noise) +
  0.01)`` (the 0.01 floor is tensor2tensor's ``noise_epsilon``); in eval the clean logits
  (deterministic).
- Gate input: the token, or (``gate_task``) the token and its dataset's task embedding,
  concatenated (the embedding is the dataset's own parameter, registered with it).
- The gate runs in float32 whatever the autocast (top-k, softmax and the normal CDF of the load
  are precision-sensitive); the experts run in the autocast dtype.
- Capacity: with ``capacity_factor`` c, an expert takes at most ``ceil(c N k / E)`` slots of a
  call (N: the call's valid tokens), first come first served: every token's first choice in
  token order, then every second choice (Switch Transformer / GShard); the rest are dropped
  (their weight is lost, not renormalised; the layer's residual carries the token through).
- Padded tokens (``padding_mask``) are routed nowhere (expert -1) and count in no statistic or loss.
- Auxiliary losses (``loss``), each times ``loss_coef``: ``cv2`` = Shazeer's ``CV(importance)^2``
  (eq. 6-7; importance: the summed gates, before capacity) ``+ CV(load)^2`` (eq. 8-11; load: the
  smooth probability of each expert being in a token's top k under the noise; with ``noisy:
  false``, or ``E == k``, the routed slot counts, which carry no gradient), 0 on perfectly
  balanced gates; ``switch`` = Fedus et al. 2021's ``E sum_e f_e P_e`` (f: the share of tokens
  whose first choice is e, before capacity; P: the mean softmax probability of e over the
  routing logits), 1 at balance, larger the more routing and probability agree on few experts.

With ``k = 1`` the gate is ``softmax`` of one logit, i.e. exactly 1: the task loss gives the
router no gradient (Shazeer's eq. 3 as written; Switch scales by the probability instead), so the
router learns from the auxiliary loss only; with ``noisy: false`` and ``loss: cv2`` not even
from that (both statistics are counts).  ``k >= 2`` lets the task loss move it.

Initialisation: each expert's matrices as the dense FFN's would be (``nn.Linear``'s
kaiming-uniform, or, in the layers UniT xavier-initialises, xavier-uniform per expert:
``reset_parameters(xavier=True)``); ``W_g`` and ``W_noise`` zero when noisy (Shazeer: all experts
start alike, the noise spreads the load); without noise ``W_g`` is ``nn.Linear``'s (a zero gate
would send every token to expert 0 forever).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from unit_fast.ops.moe_dispatch import moe_dispatch

LOSSES = ("cv2", "switch", "none")
DEFAULTS = {"layers": [], "encoder_layers": [], "num_experts": 8, "k": 1, "expert_ff": None, "noisy": True,
            "gate_task": False, "task_dim": 32, "loss": "cv2", "loss_coef": 0.01, "capacity_factor": None}
NOISE_EPS = 1e-2  # tensor2tensor's noise_epsilon: the noise never vanishes entirely
_KEY = "model.moe"


def _integer(value, key, low, allow_none=False):
    if allow_none and value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        extra = " or null" if allow_none else ""
        raise ValueError(f"{_KEY}.{key} must be an integer >= {low}{extra}, got {value!r}")
    return value


def _number(value, key, positive, allow_none=False):
    if allow_none and value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        extra = " or null" if allow_none else ""
        raise ValueError(f"{_KEY}.{key} must be a number {'>' if positive else '>='} 0{extra}, got {value!r}")
    return float(value)


def _flag(value, key):
    if not isinstance(value, bool):
        raise ValueError(f"{_KEY}.{key} must be true or false, got {value!r}")
    return value


def _indices(value, key):
    if value is None:
        return []
    if not isinstance(value, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                       and i >= 0 for i in value):
        raise ValueError(f"{_KEY}.{key} must be a list of layer indices (integers >= 0), got {value!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"{_KEY}.{key} lists a layer twice: {list(value)}")
    return sorted(value)


def moe_options(cfg) -> dict:
    """The validated ``model.moe`` mapping (``None`` or missing keys: ``DEFAULTS``); a bad value is a
    one-line ValueError naming ``model.moe.<key>``."""
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"{_KEY}: unknown key(s) {unknown}; it takes {', '.join(DEFAULTS)}")
    o = {**DEFAULTS, **cfg}
    out = {"layers": _indices(o["layers"], "layers"),
           "encoder_layers": _indices(o["encoder_layers"], "encoder_layers"),
           "num_experts": _integer(o["num_experts"], "num_experts", 1),
           "k": _integer(o["k"], "k", 1),
           "expert_ff": _integer(o["expert_ff"], "expert_ff", 1, allow_none=True),
           "noisy": _flag(o["noisy"], "noisy"), "gate_task": _flag(o["gate_task"], "gate_task"),
           "task_dim": _integer(o["task_dim"], "task_dim", 1),
           "loss_coef": _number(o["loss_coef"], "loss_coef", positive=False),
           "capacity_factor": _number(o["capacity_factor"], "capacity_factor", positive=True,
                                      allow_none=True)}
    if out["k"] > out["num_experts"]:
        raise ValueError(f"{_KEY}.k must be <= num_experts ({out['num_experts']}), got {out['k']}")
    loss = "none" if o["loss"] is None else o["loss"]
    if loss not in LOSSES:
        raise ValueError(f"{_KEY}.loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    out["loss"] = loss
    return out


def moe_enabled(cfg) -> bool:
    """Whether ``model.moe`` puts an MoE FFN in any layer (validated first)."""
    o = moe_options(cfg)
    return bool(o["layers"] or o["encoder_layers"])


def check_layer_indices(opts, key, num_layers, where):
    """ValueError unless every index of ``opts[key]`` is a layer of a ``num_layers``-layer stack."""
    bad = [i for i in opts[key] if i >= num_layers]
    if bad:
        raise ValueError(f"{_KEY}.{key} has {bad}, but the {where} has {num_layers} layers "
                         f"(indices 0..{num_layers - 1})")


def build_moe_ffn(opts, d_model, dim_feedforward):
    """The ``MoEFFN`` of one layer of width ``d_model`` from validated ``model.moe`` options
    (``expert_ff: null`` = the layer's ``dim_feedforward``)."""
    return MoEFFN(d_model, opts["num_experts"], opts["expert_ff"] or dim_feedforward, k=opts["k"],
                  noisy=opts["noisy"], task_dim=opts["task_dim"] if opts["gate_task"] else 0,
                  capacity_factor=opts["capacity_factor"], loss=opts["loss"], loss_coef=opts["loss_coef"])


def _cv_squared(x, eps=1e-10):
    """The squared coefficient of variation ``var(x) / mean(x)^2`` of ``x (E,)`` (population
    variance, as tensor2tensor's ``cv_squared``); 0 when every entry is the same."""
    if x.numel() <= 1:
        return x.new_zeros(())
    x = x.float()
    return x.var(unbiased=False) / (x.mean() ** 2 + eps)


def _slot_counts(expert_idx, num_experts, dtype=torch.int64):
    """``(E,)`` slots per expert of ``expert_idx (N, k)`` (-1 ignored); a scatter, no host sync."""
    flat = expert_idx.reshape(-1)
    counts = torch.zeros(num_experts, dtype=dtype, device=flat.device)
    return counts.scatter_add_(0, flat.clamp_min(0), (flat >= 0).to(dtype))


class MoEFFN(nn.Module):
    """Sparsely gated mixture of ``E`` expert FFNs (module docstring).

    Args: ``d_model``; ``num_experts`` E; ``expert_ff`` each expert's hidden width; ``k`` experts
    per token (``1 <= k <= E``); ``noisy``; ``task_dim`` the task embedding's size when the gate
    reads it (0: the token only); ``capacity_factor`` (None: no limit); ``loss`` cv2 | switch |
    none; ``loss_coef``; ``activation`` relu | gelu.

    Parameters: ``w1 (E, d, f)``, ``b1 (E, f)``, ``w2 (E, f, d)``, ``b2 (E, d)`` (expert e is
    ``act(x @ w1[e] + b1[e]) @ w2[e] + b2[e]``: ``w1[e]`` is ``nn.Linear(d, f).weight.T``);
    ``w_gate.weight (E, d + task_dim)``; ``w_noise.weight`` (noisy only).

    ``forward(x (S, B, d), padding_mask (B, S) bool True = padding or None, task_embedding
    (task_dim,) or None)`` -> ``y (S, B, d)`` in the dispatch dtype (the autocast dtype under
    autocast, else ``x``'s).  The call's auxiliary losses and expert usage are left in
    ``self.last``: ``{"losses": {loss name: () float32}, "usage": (E,) int64 slots each expert
    ran (after capacity)}`` (``UniT`` collects them).
    """

    def __init__(self, d_model, num_experts, expert_ff, k=1, noisy=True, task_dim=0, capacity_factor=None,
                 loss="cv2", loss_coef=1e-2, activation="relu"):
        super().__init__()
        if not 1 <= k <= num_experts:
            raise ValueError(f"{_KEY}.k must be between 1 and num_experts={num_experts}, got {k}")
        if loss not in LOSSES:
            raise ValueError(f"{_KEY}.loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        self.d_model, self.num_experts, self.expert_ff, self.k = d_model, num_experts, expert_ff, k
        self.noisy, self.task_dim, self.capacity_factor = noisy, task_dim, capacity_factor
        self.loss, self.loss_coef, self.activation = loss, loss_coef, activation
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, expert_ff))
        self.b1 = nn.Parameter(torch.empty(num_experts, expert_ff))
        self.w2 = nn.Parameter(torch.empty(num_experts, expert_ff, d_model))
        self.b2 = nn.Parameter(torch.empty(num_experts, d_model))
        d_gate = d_model + task_dim
        self.w_gate = nn.Linear(d_gate, num_experts, bias=False)
        self.w_noise = nn.Linear(d_gate, num_experts, bias=False) if noisy else None
        self.reset_parameters()
        self.last = None

    def extra_repr(self):
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, expert_ff={self.expert_ff}, "
                f"k={self.k}, noisy={self.noisy}, task_dim={self.task_dim}, "
                f"capacity_factor={self.capacity_factor}, loss={self.loss!r}, loss_coef={self.loss_coef}")

    def reset_parameters(self, xavier=False):
        """Each expert as a fresh ``nn.Linear`` pair (``xavier``: its matrices xavier-uniform, as
        UniT's encoder and shared decoder initialise the dense FFN; the biases stay
        ``nn.Linear``'s either way); the gates as in the module docstring."""
        for w, b, fan_in, fan_out in ((self.w1, self.b1, self.d_model, self.expert_ff),
                                      (self.w2, self.b2, self.expert_ff, self.d_model)):
            bound = 1 / math.sqrt(fan_in)  # nn.Linear's: kaiming_uniform(a=sqrt(5)) is U(-1/sqrt(fan_in), ..)
            if xavier:  # xavier_uniform_ on an (E, d, f) tensor would take d f as fan_in: per expert instead
                bound_w = math.sqrt(6.0 / (fan_in + fan_out))
                nn.init.uniform_(w, -bound_w, bound_w)
            else:
                nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)
        if self.noisy:
            nn.init.zeros_(self.w_gate.weight)
            nn.init.zeros_(self.w_noise.weight)
        else:
            self.w_gate.reset_parameters()

    @staticmethod
    def parameter_count(d_model, num_experts, expert_ff, noisy=True, task_dim=0):
        """The parameters of one ``MoEFFN``: ``E (2 d f + f + d)`` experts + ``(1 or 2) (d + task_dim) E``
        gates (the task embeddings are the model's, not counted here)."""
        experts = num_experts * (2 * d_model * expert_ff + expert_ff + d_model)
        return experts + (2 if noisy else 1) * (d_model + task_dim) * num_experts

    # -- routing ---------------------------------------------------------------------------------

    def route(self, x, valid, task_embedding=None):
        """``(expert_idx (N, k) int64, gates (N, k) float32, losses {name: ()}, usage (E,) int64)``
        for tokens ``x (N, d)``; ``valid (N,)`` bool (False: padding, routed nowhere, ``expert_idx``
        -1, gate 0).  Valid tokens get ``k`` distinct experts whose gates sum to 1 (less after a
        capacity drop)."""
        N, E, k = x.shape[0], self.num_experts, self.k
        if self.task_dim and task_embedding is None:
            raise ValueError(f"MoEFFN: {_KEY}.gate_task is on but no task embedding was given")
        # float32 gate under any autocast: bf16 logits tie and round the top-k and the CDF
        with torch.autocast(x.device.type, enabled=False):
            gate_in = x.float()
            if self.task_dim:
                gate_in = torch.cat([gate_in, task_embedding.float().expand(N, -1)], dim=1)  # (N, d + T)
            clean = F.linear(gate_in, self.w_gate.weight.float())  # (N, E)
            noisy_train = self.noisy and self.training
            std = None
            if noisy_train:
                std = F.softplus(F.linear(gate_in, self.w_noise.weight.float())) + NOISE_EPS  # (N, E)
                logits = clean + torch.randn_like(clean) * std
            else:
                logits = clean
            top_logits, top_idx = logits.topk(min(k + 1, E), dim=1)  # (N, k [+ 1]): the (k+1)-th is the bar
            vf = valid.float()  # (N,)
            gates = top_logits[:, :k].softmax(dim=1) * vf[:, None]  # (N, k); padding: 0
            expert_idx = top_idx[:, :k].masked_fill(~valid[:, None], -1)  # (N, k)
            losses = self._losses(clean, logits, std, top_logits, top_idx, gates, expert_idx, vf)
        if self.capacity_factor is not None:
            expert_idx, gates = self._apply_capacity(expert_idx, gates, vf.sum())
        return expert_idx, gates, losses, _slot_counts(expert_idx, E)

    def _losses(self, clean, logits, std, top_logits, top_idx, gates, expert_idx, vf):
        """The auxiliary losses of one call, before any capacity drop (they measure the router)."""
        E, k = self.num_experts, self.k
        if self.loss == "cv2":
            importance = torch.zeros_like(clean).scatter(1, top_idx[:, :k], gates).sum(0)  # (E,)
            if std is not None and E > k:
                load = self._smooth_load(clean, logits, std, top_logits, vf)
            else:  # no noise (or every expert taken): the routed slots, a count without gradient
                load = _slot_counts(expert_idx, E, torch.float32)
            return {"loss_moe_importance": self.loss_coef * _cv_squared(importance),
                    "loss_moe_load": self.loss_coef * _cv_squared(load)}
        if self.loss == "switch":
            n_valid = vf.sum().clamp_min(1.0)
            first = torch.zeros_like(clean).scatter(1, top_idx[:, :1], vf[:, None])  # (N, E): first choices
            f = first.sum(0) / n_valid  # (E,)
            P = (logits.softmax(dim=1) * vf[:, None]).sum(0) / n_valid  # (E,)
            return {"loss_moe_switch": self.loss_coef * E * (f * P).sum()}
        return {}

    def _smooth_load(self, clean, noisy, std, top_logits, vf):
        """Shazeer's eq. 8-10, ``(E,)``: ``sum_x P(x, e)``, ``P(x, e) = Phi((clean_e - kth_excluding(H,
        k, e)) / std_e)``, the probability that ``e`` is in the top k when only its own noise is
        redrawn; differentiable in ``W_g`` and ``W_noise``.  ``kth_excluding``: for ``e`` inside the
        top k, the (k+1)-th largest noisy logit; outside, the k-th (tensor2tensor ``_prob_in_top_k``)."""
        k = self.k
        threshold_in = top_logits[:, k:k + 1]  # (N, 1): the (k+1)-th
        threshold_out = top_logits[:, k - 1:k]  # (N, 1): the k-th
        is_in = noisy > threshold_in  # (N, E): inside the top k
        p_in = torch.special.ndtr((clean - threshold_in) / std)
        p_out = torch.special.ndtr((clean - threshold_out) / std)
        return (torch.where(is_in, p_in, p_out) * vf[:, None]).sum(0)

    def _apply_capacity(self, expert_idx, gates, n_valid):
        """Drop the slots past each expert's capacity ``ceil(c N k / E)`` (N = ``n_valid``, a 0-d
        tensor: no host sync), in slot order: slot j of every token before slot j + 1."""
        E, k = self.num_experts, self.k
        # float64, in the order c N k / E of the docstring's formula (a host math.ceil would agree)
        capacity = torch.ceil(self.capacity_factor * n_valid.double() * k / E).clamp_min(1)
        order = expert_idx.t().reshape(-1)  # (k N): slot 0 of every token, then slot 1, ...
        onehot = F.one_hot(order.clamp_min(0), E) * (order >= 0)[:, None]  # (k N, E)
        position = (onehot.cumsum(0) * onehot).sum(1) - 1  # (k N): rank of the slot within its expert
        keep = ((position < capacity) & (order >= 0)).view(k, -1).t()  # (N, k)
        return expert_idx.masked_fill(~keep, -1), gates * keep

    # -- forward ---------------------------------------------------------------------------------

    def forward(self, x, padding_mask=None, task_embedding=None):
        S, B, d = x.shape
        flat = x.transpose(0, 1).reshape(B * S, d)  # (B S, d): batch-major, as padding_mask (B, S)
        valid = (torch.ones(B * S, dtype=torch.bool, device=x.device) if padding_mask is None
                 else ~padding_mask.reshape(B * S))  # (B S,)
        expert_idx, gates, losses, usage = self.route(flat, valid, task_embedding)
        device = x.device.type
        # moe_dispatch is a custom op, which autocast does not cast: cast here, as a Linear would be
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else flat.dtype
        y = moe_dispatch(flat.to(dtype), expert_idx, gates.to(dtype), self.w1.to(dtype), self.b1.to(dtype),
                         self.w2.to(dtype), self.b2.to(dtype), activation=self.activation)  # (B S, d)
        self.last = {"losses": losses, "usage": usage}
        return y.view(B, S, d).transpose(0, 1)  # (S, B, d)
