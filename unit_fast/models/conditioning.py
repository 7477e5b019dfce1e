"""CA-MTL's task-conditioned modules (Pilault, El hattami & Pal, "Conditionally Adaptive Multi-Task
Learning", ICLR 2021) as an option of UniT: ``model.conditioning``.

Every dataset ``ds`` has a learned task embedding ``z_ds`` ``(task_dim,)``; generators turn it into
offsets of the shared layers.  What is conditioned (each option independent):

  ``layer_norm``      the decoder layers' ``norm1``/``norm2``/``norm3`` and the decoder's final norm
                      (it makes every intermediate output): ``gamma + dgamma``, ``beta + dbeta`` (CA-MTL's
                      conditional layer norm).  ``table``: per-dataset offsets, parameters of their own;
                      ``hypernetwork``: generated from ``z`` by one shared ``Linear(task_dim, 2 d)`` per norm.
  ``bert_layers: N``  also BERT's top N layers' ``attention.output.LayerNorm`` and ``output.LayerNorm``
                      (width ``bert_hidden``), the same way (forward hooks; identity outside a forward).
  ``attention_bias``  CA-MTL's conditional attention: a block-diagonal ``(Q, Q)`` bias added to the
                      logits of each decoder layer's query self-attention, one ``(block, block)`` block per
                      layer generated from ``z`` and repeated on the diagonal (shared by the heads).
  ``alignment``       CA-MTL's conditional alignment, as FiLM ``x (1 + gamma(z)) + beta(z)``: ``text`` on
                      the text memory (``bert_projection``'s output, ``(B, L, d_dec)``), ``memory`` on the
                      image memory (the image encoder's output after ``enc2dec_proj``, ``(HW, B, d_dec)``;
                      a text-only task has none), ``both``.
  ``adapters``        a conditional bottleneck after each decoder layer: ``x + up(act(FiLM_z(down(x))))``.

Identity at initialisation: every generator's last layer (and ``up``) starts at zero, so every offset
is exactly 0 and each conditioned op computes bitwise what the plain one does (``gamma + 0.0 ==
gamma``, ``x * 1 + 0 == x``, ``x + 0 == x``).  The attention bias is the exception: a zero bias is
still added to the logits (no host sync checks it), so the attention kernels see another input and
are only promised to agree to fp32 rounding (on CPU they happen to agree bitwise).  A bias that
trains takes torch's attention for the (small) query self-attention: the fused kernel has no
gradient wrt its mask (``TransformerDecoderLayer._self_attention``).

Gradients at step 0: the task embeddings start ``N(0, 1)``, not at zero, so the generators' zero
weights get a gradient ``dL/d(offset) z^T``; ``z`` itself gets a zero gradient until a generator is
nonzero, and the adapters' ``down`` and FiLM generator until ``up`` is.

Generators of one kind are stacked into one ``Linear`` (``norm_generator`` is the per-norm
``Linear(task_dim, 2 d)`` of every decoder norm, row blocks stacked): the same parameters as one per
norm, one matmul per forward.  ``TaskConditioning.context(ds)`` computes every offset once per
forward; the layers read them from the returned ``TaskContext``.
"""

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULTS = {"task_dim": 64, "layer_norm": "none", "bert_layers": 0, "attention_bias": False,
            "attention_block": 4, "alignment": "none", "adapters": False, "adapter_ratio": 0.25,
            "adapter_activation": "none"}
LAYER_NORM_MODES = ("none", "table", "hypernetwork")
ALIGNMENTS = ("none", "text", "memory", "both")
ADAPTER_ACTIVATIONS = {"none": None, "relu": F.relu, "gelu": F.gelu}
# Decoder norms, in the order of their offset rows: 3 per layer, then the decoder's final norm.
_LAYER_NORMS = ("norm1", "norm2", "norm3")
_KEY = "model.conditioning"


def _choice(opts, key, allowed):
    value = "none" if opts[key] is None else opts[key]  # YAML null reads as none
    if value not in allowed:
        raise ValueError(f"{_KEY}.{key} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _integer(opts, key, low):
    value = opts[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{_KEY}.{key} must be an integer >= {low}, got {value!r}")
    return value


def _flag(opts, key):
    if not isinstance(opts[key], bool):
        raise ValueError(f"{_KEY}.{key} must be true or false, got {opts[key]!r}")
    return opts[key]


def conditioning_options(cfg) -> dict:
    """The validated ``model.conditioning`` mapping (``None`` or missing keys: ``DEFAULTS``); a bad
    value is a ValueError naming ``model.conditioning.<key>``."""
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"{_KEY}: unknown key(s) {unknown}; it takes {', '.join(DEFAULTS)}")
    opts = {**DEFAULTS, **cfg}
    out = {"task_dim": _integer(opts, "task_dim", 1),
           "layer_norm": _choice(opts, "layer_norm", LAYER_NORM_MODES),
           "bert_layers": _integer(opts, "bert_layers", 0),
           "attention_bias": _flag(opts, "attention_bias"),
           "attention_block": _integer(opts, "attention_block", 1),
           "alignment": _choice(opts, "alignment", ALIGNMENTS),
           "adapters": _flag(opts, "adapters"),
           "adapter_activation": _choice(opts, "adapter_activation", tuple(ADAPTER_ACTIVATIONS))}
    ratio = opts["adapter_ratio"]
    number = isinstance(ratio, (int, float)) and not isinstance(ratio, bool)
    if not (number and math.isfinite(ratio) and ratio > 0):
        raise ValueError(f"{_KEY}.adapter_ratio must be a number > 0, got {ratio!r}")
    out["adapter_ratio"] = float(ratio)
    if out["bert_layers"] and out["layer_norm"] == "none":
        raise ValueError(f"{_KEY}.bert_layers conditions BERT's layer norms as layer_norm does: set "
                         f"{_KEY}.layer_norm to table or hypernetwork (got none)")
    return out


def conditioning_enabled(cfg) -> bool:
    """Whether ``model.conditioning`` turns anything on (validated first)."""
    o = conditioning_options(cfg)
    return (o["layer_norm"] != "none" or o["bert_layers"] > 0 or o["attention_bias"]
            or o["alignment"] != "none" or o["adapters"])


def _bottleneck(opts, d_model):
    return max(1, round(opts["adapter_ratio"] * d_model))


def _zero_linear(d_in, d_out):
    """A generator's last layer: zero weight and bias, so its output is exactly 0 at init."""
    layer = nn.Linear(d_in, d_out)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def parameter_count(cfg, d_model, num_layers, num_datasets, nhead=None, bert_hidden=None, bert_layers_norms=2,
                    d_text=None, d_memory=None) -> int:
    """The number of parameters ``TaskConditioning`` adds, computed from the config alone.

    With ``T = task_dim``, ``n = 3 num_layers + 1`` decoder norms, ``m = bert_layers_norms * bert_layers``
    BERT norms, ``D`` datasets, ``k = attention_block``, ``b = max(1, round(adapter_ratio d_model))``:
    ``D T`` (task embeddings)
    + layer_norm table: ``D (2 n d_model + 2 m bert_hidden)``;
      hypernetwork: ``(T + 1)(2 n d_model + 2 m bert_hidden)``
    + attention_bias: ``num_layers (T + 1) k^2``
    + alignment: ``(T + 1) 2 d_text`` (text), ``(T + 1) 2 d_memory`` (memory), both for both
    + adapters: ``num_layers (2 d_model b + b + d_model + (T + 1) 2 b)``.
    ``nhead`` does not enter: the attention bias is shared by the heads (kept for the constructor's
    argument list); ``d_text``, ``d_memory`` default to ``d_model``.
    """
    o = conditioning_options(cfg)
    T, d = o["task_dim"], d_model
    d_text, d_memory = d_text or d, d_memory or d
    total = num_datasets * T
    if o["layer_norm"] != "none":
        norm_widths = 2 * (3 * num_layers + 1) * d
        if o["bert_layers"]:
            if bert_hidden is None:
                raise ValueError(f"{_KEY}.bert_layers: parameter_count needs bert_hidden")
            norm_widths += 2 * bert_layers_norms * o["bert_layers"] * bert_hidden
        total += norm_widths * (num_datasets if o["layer_norm"] == "table" else T + 1)
    if o["attention_bias"]:
        total += num_layers * (T + 1) * o["attention_block"] ** 2
    if o["alignment"] in ("text", "both"):
        total += (T + 1) * 2 * d_text
    if o["alignment"] in ("memory", "both"):
        total += (T + 1) * 2 * d_memory
    if o["adapters"]:
        b = _bottleneck(o, d)
        total += num_layers * (2 * d * b + b + d + (T + 1) * 2 * b)
    return total


class _NormTable(nn.Module):
    """One dataset's layer-norm offsets (``layer_norm: table``): ``decoder (3 L + 1, 2, d)`` and
    ``bert (2 N, 2, bert_hidden)`` (rows ``[dgamma, dbeta]``), zero at init."""

    def __init__(self, num_decoder_norms, d_model, num_bert_norms, bert_hidden):
        super().__init__()
        self.decoder = nn.Parameter(torch.zeros(num_decoder_norms, 2, d_model))
        if num_bert_norms:
            self.bert = nn.Parameter(torch.zeros(num_bert_norms, 2, bert_hidden))


class _Adapter(nn.Module):
    """The fixed part of a conditional bottleneck adapter: ``down (d -> b)``, ``up (b -> d)``, ``up``
    zero at init (the adapter is then exactly the identity)."""

    def __init__(self, d_model, bottleneck):
        super().__init__()
        self.down = nn.Linear(d_model, bottleneck)
        self.up = _zero_linear(bottleneck, d_model)


def _film(x, film):
    """``x (1 + gamma) + beta``; ``film (2, d)`` = ``[gamma, beta]`` broadcast over ``x (..., d)``."""
    return x * (1 + film[0]) + film[1]


class TaskConditioning(nn.Module):
    """CA-MTL's conditioned modules for a UniT (module docstring).

    Args:
        cfg: the ``model.conditioning`` mapping (validated here).
        d_model: the decoder width ``d_dec``; nhead: its heads (the attention bias is shared by
            them); num_layers: decoder layers.
        datasets: dataset names, one task embedding (and norm table) each.
        d_text, d_memory: widths of the FiLMed text and image memories (default ``d_model``).
        bert_hidden: BERT's hidden size (needed with ``bert_layers``).

    Parameters (the state-dict keys, under ``conditioning.`` in a UniT): ``task_embeddings.<ds>``
    ``(1, task_dim)``; ``norm_tables.<ds>.{decoder, bert}`` (table) or ``norm_generator``,
    ``bert_norm_generator`` (hypernetwork); ``attention_bias_generator``; ``text_film_generator``,
    ``memory_film_generator``; ``adapters.<layer>.{down, up}``, ``adapter_film_generator``.
    """

    def __init__(self, cfg, d_model, nhead, num_layers, datasets, d_text=None, d_memory=None,
                 bert_hidden=None):
        super().__init__()
        o = conditioning_options(cfg)
        if o["bert_layers"] and bert_hidden is None:
            raise ValueError(f"{_KEY}.bert_layers is {o['bert_layers']}, but no bert_hidden was given")
        self.options = o
        self.d_model, self.nhead, self.num_layers = d_model, nhead, num_layers
        self.d_text, self.d_memory, self.bert_hidden = d_text or d_model, d_memory or d_model, bert_hidden
        T = o["task_dim"]
        self.num_decoder_norms = 3 * num_layers + 1
        self.num_bert_norms = 2 * o["bert_layers"]
        self.task_embeddings = nn.ModuleDict()
        self.norm_tables = nn.ModuleDict() if o["layer_norm"] == "table" else None
        if o["layer_norm"] == "hypernetwork":
            self.norm_generator = _zero_linear(T, self.num_decoder_norms * 2 * d_model)
            if self.num_bert_norms:
                self.bert_norm_generator = _zero_linear(T, self.num_bert_norms * 2 * bert_hidden)
        if o["attention_bias"]:
            self.attention_bias_generator = _zero_linear(T, num_layers * o["attention_block"] ** 2)
        if o["alignment"] in ("text", "both"):
            self.text_film_generator = _zero_linear(T, 2 * self.d_text)
        if o["alignment"] in ("memory", "both"):
            self.memory_film_generator = _zero_linear(T, 2 * self.d_memory)
        if o["adapters"]:
            b = _bottleneck(o, d_model)
            self.adapters = nn.ModuleList([_Adapter(d_model, b) for _ in range(num_layers)])
            self.adapter_film_generator = _zero_linear(T, num_layers * 2 * b)
        for ds in datasets:
            self.add_dataset(ds)
        self._bert_context = None  # the TaskContext BERT's hooked norms read, during a forward only

    def extra_repr(self):
        on = {k: v for k, v in self.options.items() if v != DEFAULTS[k] or k == "task_dim"}
        return ", ".join(f"{k}={v!r}" for k, v in on.items())

    def add_dataset(self, ds):
        """Dataset ``ds``'s task embedding (``N(0, 1)``) and, with ``layer_norm: table``, its zero
        norm offsets.  Returns the module paths of its parameters (relative to this module)."""
        if ds in self.task_embeddings:
            raise ValueError(f"TaskConditioning: dataset {ds!r} already has a task embedding")
        # N(0, 1) (nn.Embedding's init), not zero: see the module docstring.
        self.task_embeddings[ds] = nn.Embedding(1, self.options["task_dim"])
        if self.norm_tables is not None:
            self.norm_tables[ds] = _NormTable(self.num_decoder_norms, self.d_model, self.num_bert_norms,
                                              self.bert_hidden)
        return self.dataset_prefixes(ds)

    def dataset_prefixes(self, ds):
        """Module paths (relative to this module) of dataset ``ds``'s own parameters: its task
        embedding and norm table; everything else here is shared by the datasets."""
        return [f"task_embeddings.{ds}"] + ([f"norm_tables.{ds}"] if self.norm_tables is not None else [])

    def context(self, ds) -> "TaskContext":
        """The offsets of dataset ``ds`` for one forward (generated from its ``z`` now)."""
        if ds not in self.task_embeddings:
            raise ValueError(f"TaskConditioning: no task embedding for dataset {ds!r}; it has "
                             f"{list(self.task_embeddings)}")
        return TaskContext(self, ds)

    # -- BERT's layer norms ----------------------------------------------------------------------

    def attach_bert(self, layers):
        """Hook the two layer norms of each of the top ``bert_layers`` (the option) of ``layers`` (HF
        ``BertEncoder.layer``, a list of ``BertLayer``).  The hooks act only inside ``bert_context``."""
        n = self.options["bert_layers"]
        if n > len(layers):
            raise ValueError(f"{_KEY}.bert_layers is {n}, but BERT has {len(layers)} layers")
        for i, layer in enumerate(layers[len(layers) - n:]):
            for j, ln in enumerate((layer.attention.output.LayerNorm, layer.output.LayerNorm)):
                # The row index lives on the module and the hook is a bound method: a deep copy of
                # the model then hooks its own copy of this module (a closure would keep this one).
                ln._conditioning_row = 2 * i + j
                ln.register_forward_hook(self._bert_norm_hook)

    def _bert_norm_hook(self, module, args, output):
        ctx = self._bert_context
        if ctx is None:
            return None  # outside a conditioned forward: BERT's own output
        # The norm again, with the offsets (the module's own output is dropped): a hook keeps HF's
        # modules and state-dict keys as they are, for the cost of one extra layer norm.
        return ctx.bert_norm(module._conditioning_row, module, args[0])

    @contextlib.contextmanager
    def bert_context(self, ctx):
        """BERT's hooked norms use ``ctx`` inside this block."""
        previous, self._bert_context = self._bert_context, ctx
        try:
            yield
        finally:
            self._bert_context = previous


class TaskContext:
    """One forward's conditioning of one dataset: every offset generated from its ``z`` once.

    Methods return their input unchanged (or None) for an option that is off.  Offsets are in
    the generators' output dtype (bfloat16 under autocast); the norms add them to their fp32
    parameters (fp32 by type promotion).
    """

    def __init__(self, owner: TaskConditioning, ds):
        o = owner.options
        self.dataset = ds
        self.z = z = owner.task_embeddings[ds].weight[0]  # (task_dim,)
        L, d = owner.num_layers, owner.d_model
        self._num_layers = L
        self._norms = self._bert_norms = self._attn = self._adapter_film = None
        self._text_film = self._memory_film = None
        if o["layer_norm"] == "table":
            table = owner.norm_tables[ds]
            self._norms = table.decoder  # (3 L + 1, 2, d)
            self._bert_norms = getattr(table, "bert", None)  # (2 N, 2, bert_hidden)
        elif o["layer_norm"] == "hypernetwork":
            self._norms = owner.norm_generator(z).view(owner.num_decoder_norms, 2, d)
            if owner.num_bert_norms:
                bert = owner.bert_norm_generator(z)
                self._bert_norms = bert.view(owner.num_bert_norms, 2, owner.bert_hidden)
        if o["attention_bias"]:
            k = o["attention_block"]
            self._attn = owner.attention_bias_generator(z).view(L, k, k)
        if o["alignment"] in ("text", "both"):
            self._text_film = owner.text_film_generator(z).view(2, owner.d_text)
        if o["alignment"] in ("memory", "both"):
            self._memory_film = owner.memory_film_generator(z).view(2, owner.d_memory)
        if o["adapters"]:
            self._adapters = owner.adapters
            self._adapter_film = owner.adapter_film_generator(z).view(L, 2, -1)  # (L, 2, b)
            self._adapter_act = ADAPTER_ACTIVATIONS[o["adapter_activation"]]

    @staticmethod
    def _layer_norm(ln, x, offsets):
        # gamma + 0.0 == gamma bitwise: with zero offsets this is exactly ln(x).
        return F.layer_norm(x, ln.normalized_shape, ln.weight + offsets[0], ln.bias + offsets[1], ln.eps)

    def norm(self, layer_idx, which, ln: nn.LayerNorm, x: Tensor) -> Tensor:
        """``ln(x)`` with this dataset's offsets: ``which`` ``"norm1"|"norm2"|"norm3"`` of decoder layer
        ``layer_idx``, or ``"final"`` (the decoder's norm; ``layer_idx`` unused).  ``x (..., d)``."""
        if self._norms is None:
            return ln(x)
        row = 3 * self._num_layers if which == "final" else 3 * layer_idx + _LAYER_NORMS.index(which)
        return self._layer_norm(ln, x, self._norms[row])

    def bert_norm(self, row, ln: nn.LayerNorm, x: Tensor) -> Tensor:
        """BERT's hooked norm ``row`` (``2 i + j``: layer ``i`` of the top N; ``j`` 0 attention, 1 output)."""
        return self._layer_norm(ln, x, self._bert_norms[row])

    def self_attn_bias(self, layer_idx, num_queries) -> Tensor | None:
        """The additive ``(Q, Q)`` bias of decoder layer ``layer_idx``'s query self-attention:
        its ``(k, k)`` block repeated on the diagonal ``ceil(Q / k)`` times, cut to ``Q``; 0 off the
        blocks.  None with ``attention_bias`` off."""
        if self._attn is None:
            return None
        block = self._attn[layer_idx]  # (k, k)
        n = -(-num_queries // block.shape[0])
        return torch.block_diag(*[block] * n)[:num_queries, :num_queries]  # (Q, Q)

    def adapter(self, layer_idx, x: Tensor) -> Tensor:
        """``x + up(act(FiLM_z(down(x))))`` after decoder layer ``layer_idx``; ``x (Q, B, d)``."""
        if self._adapter_film is None:
            return x
        a = self._adapters[layer_idx]
        h = _film(a.down(x), self._adapter_film[layer_idx])  # (Q, B, b)
        if self._adapter_act is not None:
            h = self._adapter_act(h)
        return x + a.up(h)

    def film_text(self, x: Tensor) -> Tensor:
        """FiLM of the text memory ``(B, L, d_text)`` (alignment text / both)."""
        return x if self._text_film is None else _film(x, self._text_film)

    def film_memory(self, x: Tensor) -> Tensor:
        """FiLM of the image memory ``(HW, B, d_memory)`` (alignment memory / both)."""
        return x if self._memory_film is None else _film(x, self._memory_film)
