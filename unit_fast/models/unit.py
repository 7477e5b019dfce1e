"""UniT (Hu & Singh 2021) as MMF defines it: ``UniTBaseModel`` (image side + transformer +
query embeddings) and ``UniT`` (BERT, task heads, losses).

Written from the facts of MMF ``mmf/models/unit/{unit.py, unit_base_model.py}``
(``shared/reference/unit_mmf_detr.md`` sections 1.2, 1.3, 2).  Module and parameter names are
MMF's, so ``state_dict()`` keys are MMF's, duplicate aliases included.

One model code, two implementations over the same parameters (``model.implementation``):
  ``"fast"``       (the default) unit_fast's fused attention (``patch_attention(drop_weights=True)``),
                   one batched matching solve for every decoder layer, fused matching cost and box
                   losses, no host sync in the detection loss; bf16 autocast on GPUs that support it
                   (``model.autocast_dtype: auto``).
  ``"reference"``  MMF's numerics end to end: ``torch.nn.MultiheadAttention``, the matching cost
                   composed in torch and scipy per decoder layer, torch box losses, no autocast and
                   no unit_fast kernel.
It can be switched after construction with ``set_implementation``; parameters never change.
("backend" names a kernel backend of one op: cpp, triton, torch, reference.)

``model.conditioning`` (off by default) adds CA-MTL's task-conditioned modules
(``unit_fast/models/conditioning.py``) under ``conditioning.``; off, the model and its keys are MMF's.
``model.moe`` (off by default) makes chosen encoder/decoder layers' FFNs sparsely gated mixtures of
experts (``models/moe.py``: ``<layer>.moe.*`` instead of ``<layer>.linear1/linear2``, per-dataset gate
task embeddings under ``moe_task_embeddings.``); ``model.medusa`` (off by default) adds Medusa's
per-dataset feature and multi-scale attention (``models/medusa.py``) under ``medusa.``.

Deliberate differences from MMF: batches may hold several images of different sizes (padded,
each with its mask), which MMF's one-image-per-GPU runs never exercised; targets are passed as
lists of dicts, not pickled byte tensors.
"""

import contextlib

import torch
from torch import nn
from transformers.models.bert.modeling_bert import BertPredictionHeadTransform

from unit_fast.models.backbone import build_backbone
from unit_fast.models.conditioning import TaskConditioning, conditioning_enabled, conditioning_options
from unit_fast.models.criterion import build_detection_loss
from unit_fast.models.heads import MLP, AttributeHead
from unit_fast.models.medusa import Medusa, medusa_enabled
from unit_fast.models.misc import NestedTensor
from unit_fast.models.moe import MoEFFN, moe_enabled, moe_options
from unit_fast.models.text_encoder import BertTextEncoder
from unit_fast.models.transformer import UniTTransformer
from unit_fast.nn import patch_attention

TASK_TYPES = ("detection", "vl", "glue")
IMPLEMENTATIONS = ("reference", "fast")


class UniTBaseModel(nn.Module):
    """Backbone + ``input_proj`` + ``UniTTransformer`` + per-dataset query embeddings.

    ``cfg``: the ``base_args`` mapping (``backbone``, ``lr_backbone``, ``dilation``,
    ``backbone_weights``, ``encoder_hidden_dim``, ``decoder_hidden_dim``, ``num_queries``
    ``{task: {dataset: Q}}``, and the transformer's keys); ``moe``: validated ``model.moe``
    options when it is on, else None.
    """

    def __init__(self, cfg, moe=None):
        super().__init__()
        self.backbone = build_backbone(backbone=cfg["backbone"], lr_backbone=cfg["lr_backbone"],
                                       dilation=cfg["dilation"], hidden_dim=cfg["encoder_hidden_dim"],
                                       weights=cfg.get("backbone_weights"),
                                       norm=cfg.get("backbone_norm", "frozen_bn"),
                                       last_layer=cfg.get("backbone_last_layer", "layer4"))
        datasets = {task: list(qs) for task, qs in cfg["num_queries"].items()}
        self.transformer = UniTTransformer(cfg, datasets, moe=moe)
        d_dec = cfg["decoder_hidden_dim"]
        self.d_dec = d_dec
        self.num_queries = {task: dict(qs) for task, qs in cfg["num_queries"].items()}
        self.query_embeds = nn.ModuleDict({
            task: nn.ModuleDict({ds: nn.Embedding(q, d_dec) for ds, q in qs.items()})
            for task, qs in cfg["num_queries"].items()
        })
        self.input_proj = nn.Conv2d(self.backbone.num_channels, cfg["encoder_hidden_dim"], kernel_size=1)

    def add_queries(self, task, ds, num_queries):
        """A new dataset's ``num_queries`` query embeddings (and its decoder: shared or its own)."""
        self.num_queries.setdefault(task, {})[ds] = num_queries
        if task not in self.query_embeds:
            self.query_embeds[task] = nn.ModuleDict()
        self.query_embeds[task][ds] = nn.Embedding(num_queries, self.d_dec)
        self.transformer.add_decoder(task, ds)

    def forward(self, img_src, text_src=None, text_mask=None, text_pos=None, output_hidden_states_only=False,
                task_type="detection", dataset_name="detection_coco", task_idx=None, conditioning=None,
                moe_task=None, medusa=None):
        """``{"hidden_states": (dec_layers, B, Q, d_dec)}``.

        ``img_src``: a ``NestedTensor`` (padded ``(B, 3, H, W)`` + mask), a list of ``(3, H_i, W_i)``
        images, a ``(B, 3, H, W)`` tensor of same-size images, or None (GLUE).  ``conditioning``:
        the dataset's ``TaskContext`` (``model.conditioning``) or None; ``moe_task``: its MoE gate
        task embedding ``(task_dim,)`` or None; ``medusa``: its ``MedusaContext`` or None (with
        ``multiscale: backbone`` the image features are its mix of the backbone's stages).
        """
        img_feat = img_mask = img_pos = None
        if img_src is not None:
            if not isinstance(img_src, NestedTensor):
                img_src = NestedTensor.from_tensor_list(list(img_src))
            if medusa is not None and medusa.mixes_stages:
                features, pos, stages = self.backbone(img_src, return_stages=True)
                src, img_mask = features[-1].decompose()
                img_feat = medusa.mix_stages([s.tensors for s in stages], self.input_proj)  # (B, d_enc, H, W)
            else:
                features, pos = self.backbone(img_src)
                src, img_mask = features[-1].decompose()
                img_feat = self.input_proj(src)
            img_pos = pos[-1]
        query_embed = self.query_embeds[task_type][dataset_name].weight
        hs, _ = self.transformer(img_feat, img_mask, img_pos, text_src, text_mask, text_pos, query_embed,
                                 task_type=task_type, dataset_name=dataset_name, task_idx=task_idx,
                                 conditioning=conditioning, moe_task=moe_task, medusa=medusa)
        if hs.shape[2] != self.num_queries[task_type][dataset_name]:
            raise RuntimeError(f"UniTBaseModel: {hs.shape[2]} queries out, expected "
                               f"{self.num_queries[task_type][dataset_name]}")
        return {"hidden_states": hs}


def _classifier(d_dec, num_labels, bert_config):
    """MMF's ``Sequential(BertPredictionHeadTransform(hidden_size=d_dec), Linear(d_dec, num_labels))``."""
    cfg = bert_config.__class__(**{**bert_config.to_dict(), "hidden_size": d_dec})
    return nn.Sequential(BertPredictionHeadTransform(cfg), nn.Linear(d_dec, num_labels))


class UniT(nn.Module):
    """The whole model: ``forward(sample)`` for any configured dataset.

    ``cfg`` (a mapping, see ``unit_fast/configs/defaults.yaml``): ``base_args``, ``heads``
    ``{task: {dataset: {kind, task_idx, task_token, num_classes|num_labels, use_attr,
    loss_type}}}``, ``bert`` ``{pretrained, config}``, ``keep_only_bert_cls``,
    ``use_task_embedding_in_lang_encoder``, ``max_task_num``, ``detection_loss_weight``,
    ``loss_on_all_hs``, ``predict_attributes``, ``implementation``, ``autocast_dtype``,
    ``conditioning``, ``moe``, ``medusa``.  It is read once, here; ``forward`` looks nothing up in it.

    ``moe_usage()`` reports the experts' slot counts of the last forward; the MoE auxiliary losses
    are loss keys of their own (``{split}/{ds}/loss_moe_*``, summed over the MoE layers).

    ``conditioning``: a ``TaskConditioning`` when any ``model.conditioning`` option is on (built
    last, so the other weights are those of the same seed without it), else None; its
    per-dataset parameters (task embeddings, norm tables) are registered with their datasets.

    Per-dataset parameters (query embeddings, a separate decoder, task tokens, heads, the MoE
    gate task embedding ``moe_task_embeddings.<ds>``, Medusa's gate and scale logits) are
    registered with their dataset's name (``register_dataset_parameters``), so that
    ``dataset_parameters()`` tells them from the shared body (``training.freeze: shared``).
    A dataset's task token is the row ``task_idx`` of MMF's tables (``task_token: table``, MMF's
    datasets) or its own ``(1, H)`` embedding (``task_token: own``: datasets added later).
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg  # kept for reference (export, repr); forward reads the attributes below
        base = cfg["base_args"]
        self._base = base
        moe = moe_options(cfg.get("moe"))  # a bad value is an error even with every option off
        self._moe = moe if moe_enabled(moe) else None
        self.unit_base_model = UniTBaseModel(base, moe=self._moe)
        self.bert_model = BertTextEncoder(cfg["bert"].get("pretrained"), cfg["bert"].get("config"))
        bert_hidden = self.bert_model.config.hidden_size
        d_dec = base["decoder_hidden_dim"]
        self.bert_projection = nn.Linear(bert_hidden, d_dec)
        self.bert_pos_projection = nn.Linear(bert_hidden, d_dec)
        self.use_task_embedding_in_lang_encoder = cfg["use_task_embedding_in_lang_encoder"]
        self.task_embeddings_lang = (nn.Embedding(cfg["max_task_num"], bert_hidden)
                                     if self.use_task_embedding_in_lang_encoder else nn.Identity())
        self.task_tokens_lang = nn.ModuleDict()  # task_token: own (empty for MMF's datasets)
        self.detection_loss_weight = cfg["detection_loss_weight"]
        self.loss_on_all_hs = cfg["loss_on_all_hs"]
        self.predict_attributes = cfg["predict_attributes"]
        self.autocast = cfg.get("autocast_dtype")
        self.keep_only_cls = {}  # {dataset: bool}
        self.heads, self.kinds = {}, {}  # {task: {dataset: head cfg}}, {dataset: TaskKind}
        self._dataset_params = {}  # {dataset: [(parameter name, row or None)]}
        self.class_embeds, self.bbox_embeds, self.det_losses = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self.classifiers = nn.ModuleDict()
        # Heads for the datasets the model has queries for (``num_queries``), configured in ``heads``.
        # In MMF's order (detection heads, then vl, then glue classifiers): the same initial weights.
        for task in sorted(base["num_queries"], key=lambda t: TASK_TYPES.index(t) if t in TASK_TYPES else -1):
            for ds in base["num_queries"][task]:
                self._add_head(task, ds, self._head_cfg(cfg, task, ds), cfg["keep_only_bert_cls"])
        self.dropout = nn.Dropout(cfg.get("classifier_dropout", 0.1))
        self.conditioning = None
        cond_cfg = cfg.get("conditioning")
        conditioning_options(cond_cfg)  # a bad value is an error even with every option off
        if conditioning_enabled(cond_cfg):
            datasets = [ds for heads in self.heads.values() for ds in heads]
            self.conditioning = TaskConditioning(cond_cfg, d_dec, base["nheads"], base["dec_layers"],
                                                 datasets, d_text=d_dec, d_memory=d_dec,
                                                 bert_hidden=bert_hidden)
            if self.conditioning.options["bert_layers"]:
                self.conditioning.attach_bert(self.bert_model.module.encoder.layer)
            for ds in datasets:
                self._register_conditioning(ds, self.conditioning.dataset_prefixes(ds))
        # model.moe.gate_task: one (1, task_dim) embedding per dataset, read by every MoE gate
        self.moe_task_embeddings = None
        if self._moe is not None and self._moe["gate_task"]:
            self.moe_task_embeddings = nn.ModuleDict()
            for heads in self.heads.values():
                for ds in heads:
                    self._add_moe_task_embedding(ds)
        self.medusa = None
        medusa_cfg = cfg.get("medusa")
        if medusa_enabled(medusa_cfg):  # built last: the other weights are those of the same seed without it
            images = {ds: task in ("vl", "detection") for task, heads in self.heads.items() for ds in heads}
            self.medusa = Medusa(medusa_cfg, images, d_dec,
                                 stage_channels=self.unit_base_model.backbone.stage_channels,
                                 d_enc=base["encoder_hidden_dim"], enc_layers=base["enc_layers"])
            for ds in images:
                self._register_medusa(ds, self.medusa.dataset_prefixes(ds))
        self.implementation = None
        self.set_implementation(cfg.get("implementation", "fast"))

    @staticmethod
    def _head_cfg(cfg, task, ds):
        if task not in TASK_TYPES:
            raise ValueError(f"UniT: num_queries has task type {task!r}; expected one of {TASK_TYPES}")
        try:
            return dict(cfg["heads"][task][ds])
        except KeyError:
            raise ValueError(f"UniT: dataset {ds!r} has queries but no model.heads.{task}.{ds} entry") from None

    # -- per-dataset parameters ----------------------------------------------------------------

    def register_dataset_parameters(self, ds, prefix, row=None):
        """Register the parameters under module path ``prefix`` (or the one parameter named
        ``prefix``) as dataset ``ds``'s; ``row``: only that row of it (a task-token table)."""
        self._dataset_params.setdefault(ds, []).append((prefix, row))

    def _register_conditioning(self, ds, prefixes):
        for prefix in prefixes:
            self.register_dataset_parameters(ds, f"conditioning.{prefix}")

    def _register_medusa(self, ds, prefixes):
        for prefix in prefixes:
            self.register_dataset_parameters(ds, f"medusa.{prefix}")

    def _add_moe_task_embedding(self, ds):
        # N(0, 1) (nn.Embedding's): with the gates zero at init it gets a gradient once W_g has moved
        self.moe_task_embeddings[ds] = nn.Embedding(1, self._moe["task_dim"])
        self.register_dataset_parameters(ds, f"moe_task_embeddings.{ds}")

    def dataset_parameters(self):
        """``{dataset: [(parameter name, row or None)]}``: every registered per-dataset
        parameter, named as ``named_parameters()`` names it; ``row`` an int when only that row
        of a shared table (MMF's task-token tables) belongs to the dataset."""
        names = [n for n, _ in self.named_parameters()]
        out = {}
        for ds, entries in self._dataset_params.items():
            found = []
            for prefix, row in entries:
                found += [(n, row) for n in names if n == prefix or n.startswith(prefix + ".")]
            out[ds] = found
        return out

    def head_prefixes(self, ds):
        """Module paths of dataset ``ds``'s output head (what fine-tuning re-initialises when its
        class count changes): the class head and its loss (no-object weight, attribute head), or
        the classifier."""
        task = self.task_type(ds)
        if task == "detection":
            return [f"class_embeds.{ds}", f"det_losses.{ds}"]
        return [f"classifiers.{task}.{ds}"]

    def _add_head(self, task, ds, head, keep_only_cls):
        from unit_fast.tasks import model_kind

        base, d_dec = self._base, self._base["decoder_hidden_dim"]
        kind = model_kind(ds, task, head)
        if kind.model_task != task:
            raise ValueError(f"UniT: dataset {ds!r} of kind {kind.name} needs num_queries.{kind.model_task}, "
                             f"got num_queries.{task}")
        self.heads.setdefault(task, {})[ds] = head
        self.kinds[ds] = kind
        self.keep_only_cls[ds] = bool(keep_only_cls.get(task, {}).get(ds, False))
        reg = self.register_dataset_parameters
        reg(ds, f"unit_base_model.query_embeds.{task}.{ds}")
        if not self.unit_base_model.transformer.share_decoders:
            reg(ds, f"unit_base_model.transformer.decoders.{task}.{ds}")
        own = head.get("task_token", "table") == "own"
        if head.get("task_token", "table") not in ("table", "own"):
            raise ValueError(f"model.heads.{task}.{ds}.task_token must be table or own, got {head['task_token']!r}")
        if not own and head.get("task_idx") is None and (self.use_task_embedding_in_lang_encoder
                                                        or self.unit_base_model.transformer.mem_out_begin_idx):
            raise ValueError(f"model.heads.{task}.{ds}: task_idx is not set (or set task_token: own)")
        text, image = task in ("vl", "glue"), task in ("vl", "detection")
        if own:
            if self.use_task_embedding_in_lang_encoder and text:
                self.task_tokens_lang[ds] = nn.Embedding(1, self.bert_model.config.hidden_size)
                reg(ds, f"task_tokens_lang.{ds}")
            if image and self.unit_base_model.transformer.mem_out_begin_idx:
                self.unit_base_model.transformer.add_task_token(ds)
                reg(ds, f"unit_base_model.transformer.task_tokens_enc.{ds}")
        else:
            if self.use_task_embedding_in_lang_encoder and text:
                reg(ds, "task_embeddings_lang.weight", head["task_idx"])
            if image and self.unit_base_model.transformer.mem_out_begin_idx:
                reg(ds, "unit_base_model.transformer.task_embeddings_enc.weight", head["task_idx"])
        count = "num_classes" if task == "detection" else "num_labels"
        if not isinstance(head.get(count), int):  # null in a config: the data's count, set by configure_model
            raise ValueError(f"model.heads.{task}.{ds}.{count} is not set (with data, the trainer takes it from "
                             f"the data), got {head.get(count)!r}")
        if task == "detection":
            n_cls = head["num_classes"]
            self.class_embeds[ds] = nn.Linear(d_dec, n_cls + 1)
            self.bbox_embeds[ds] = MLP(d_dec, d_dec, 4, 3)
            attr_head = (AttributeHead(n_cls, base["attribute_class_num"], d_dec) if head.get("use_attr", False)
                         else None)
            self.det_losses[ds] = build_detection_loss(
                n_cls, set_cost_class=base["set_cost_class"], set_cost_bbox=base["set_cost_bbox"],
                set_cost_giou=base["set_cost_giou"], bbox_loss_coef=base["bbox_loss_coef"],
                giou_loss_coef=base["giou_loss_coef"], attr_loss_coef=base["attr_loss_coef"],
                eos_coef=base["eos_coef"], dec_layers=base["dec_layers"], aux_loss=base["aux_loss"],
                use_bcl=base["use_bcl"], attribute_head=attr_head,
                attribute_class_num=base["attribute_class_num"], max_attribute_num=base["max_attribute_num"])
            for prefix in (f"class_embeds.{ds}", f"bbox_embeds.{ds}", f"det_losses.{ds}"):
                reg(ds, prefix)
        else:
            if task not in self.classifiers:
                self.classifiers[task] = nn.ModuleDict()
            self.classifiers[task][ds] = _classifier(d_dec, head["num_labels"], self.bert_model.config)
            reg(ds, f"classifiers.{task}.{ds}")

    def add_dataset(self, ds, head, num_queries, keep_only_cls=None):
        """Add dataset ``ds`` to the model: its query embeddings (and decoder, when decoders are
        separate), task token and head, from ``head`` (a ``model.heads.<task>.<ds>`` mapping
        with ``kind``); ``keep_only_cls``: decode from BERT's [CLS] only (text kinds; default the
        kind's).  New modules start on the model's device and dtype; every existing parameter
        is untouched.  Returns the new parameters' names."""
        from unit_fast.tasks import task_kind

        if any(ds in h for h in self.heads.values()):
            raise ValueError(f"UniT.add_dataset: the model already serves {ds!r}")
        kind = task_kind(head.get("kind"), "add_dataset kind")
        task = kind.model_task
        ref = next(self.parameters())
        before = {n for n, _ in self.named_parameters()}
        self.unit_base_model.add_queries(task, ds, num_queries)
        cls = kind.keep_only_cls if keep_only_cls is None else keep_only_cls
        self._add_head(task, ds, dict(head), {task: {ds: bool(cls)}})
        if self.conditioning is not None:  # its task embedding (and norm table)
            self._register_conditioning(ds, self.conditioning.add_dataset(ds))
        if self.moe_task_embeddings is not None:
            self._add_moe_task_embedding(ds)
        if self.medusa is not None:  # its feature gate (and scale logits, with an image)
            self._register_medusa(ds, self.medusa.add_dataset(ds, task in ("vl", "detection")))
        self.to(device=ref.device)
        for crit in self.det_losses.values():
            crit.set_implementation(self.implementation, None)
        if self.implementation == "fast":  # the new decoder's attention modules take the fast path
            patch_attention(self.unit_base_model, drop_weights=True)
        return [n for n, _ in self.named_parameters() if n not in before]

    # -- execution path ------------------------------------------------------------------------

    def set_implementation(self, implementation, *, kernel_backend=None):
        """Switch between ``"fast"`` and ``"reference"`` in place (same parameters).

        ``kernel_backend`` (fast only) forces the attention, matching-cost and box-loss kernels'
        backend, e.g. ``"triton"`` to run the Triton kernels through the interpreter on CPU
        (tests); None = each op's default for the device."""
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"UniT: implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
        self.implementation = implementation
        fast = implementation == "fast"
        if fast:
            patch_attention(self.unit_base_model, drop_weights=True, backend=kernel_backend)
        else:  # back to torch's own class: same parameters, torch's forward
            for m in self.unit_base_model.modules():
                if isinstance(m, nn.MultiheadAttention) and type(m) is not nn.MultiheadAttention:
                    m.__class__ = nn.MultiheadAttention
        for crit in self.det_losses.values():
            crit.set_implementation(implementation, kernel_backend if fast else None)
        return self

    def autocast_dtype(self, device_type):
        """The dtype the forward autocasts to on ``device_type``, or None: only on the fast
        implementation; ``model.autocast_dtype: auto`` = bfloat16 on a CUDA device that supports
        it, none elsewhere."""
        amp = self.autocast
        if not amp or self.implementation != "fast":
            return None
        if amp == "auto":
            supported = device_type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            return torch.bfloat16 if supported else None
        return getattr(torch, amp)

    # -- inputs --------------------------------------------------------------------------------

    def task_type(self, dataset_name):
        for task in ("vl", "glue", "detection"):
            if dataset_name in self.heads.get(task, {}):
                return task
        raise ValueError(f"UniT: unknown dataset {dataset_name!r}; this model has: "
                         f"{ {t: list(h) for t, h in self.heads.items()} }")

    def forward_bert_with_task_idx(self, sample, task_idx, dataset_name=None):
        """``(sequence_output (B, L, H_bert), pos_embeddings (L, H_bert))`` as MMF computes them:
        an optional task token (the raw embedding row) prepended before BERT's encoder and
        dropped after; the positions are BERT's learned position table rows ``0 .. L-1``."""
        bert = self.bert_model.module
        input_ids, input_mask = sample["input_ids"], sample["input_mask"]
        segment_ids = sample.get("segment_ids")
        if segment_ids is None:
            segment_ids = torch.zeros_like(input_ids)
        L = input_ids.shape[1]
        position_ids = torch.arange(L, device=input_ids.device).unsqueeze(0)  # (1, L)
        emb = bert.embeddings(input_ids=input_ids, position_ids=position_ids, token_type_ids=segment_ids)
        mask = input_mask
        if self.use_task_embedding_in_lang_encoder:
            own = self.task_tokens_lang[dataset_name] if dataset_name in self.task_tokens_lang else None
            row = own.weight[0] if own is not None else self.task_embeddings_lang.weight[task_idx]
            token = row.view(1, 1, -1).expand(emb.shape[0], 1, -1)
            emb = torch.cat([token.to(emb.dtype), emb], dim=1)  # (B, 1 + L, H_bert)
            mask = torch.cat([mask.new_ones(mask.shape[0], 1), mask], dim=1)
        extended = (1.0 - mask[:, None, None, :].to(emb.dtype)) * -10000.0  # (B, 1, 1, L'): MMF's additive mask
        out = bert.encoder(emb, attention_mask=extended)[0]
        if self.use_task_embedding_in_lang_encoder:
            out = out[:, 1:]
        pos = bert.embeddings.position_embeddings.weight[:L]  # (L, H_bert)
        return out, pos

    # -- forward -------------------------------------------------------------------------------

    def forward(self, sample):
        """One batch of one dataset (under ``torch.autocast`` when ``autocast_dtype`` gives a dtype:
        by default ``bfloat16`` on GPUs that support it, with the fast implementation; the losses
        stay float32).

        ``sample`` (a mapping): ``dataset_name``; ``dataset_type`` (``"train"``/``"val"``/
        ``"test"``, default ``"train"``); ``image`` (see ``UniTBaseModel.forward``) for detection
        and vl; ``input_ids``, ``input_mask``, optional ``segment_ids`` ``(B, L)`` for vl and glue;
        ``targets``: detection, a list of B dicts (``labels (T_i,)``, ``boxes (T_i, 4)``
        normalised cxcywh, optional ``attributes (T_i, 16)``); vl/glue, ``(B, num_labels)`` soft
        scores (BCE heads) or ``(B,)`` class indices (CE heads).  Without targets no loss is made.

        Returns: detection ``{hidden_states, pred_logits, pred_boxes, hs_for_attr, [aux_outputs],
        [losses], [attr_logits]}``; vl/glue ``{scores, [losses]}``; loss keys
        ``"{dataset_type}/{dataset_name}/{loss}"``.
        """
        device_type = next(self.parameters()).device.type
        dtype = self.autocast_dtype(device_type)
        if dtype is not None:
            with torch.autocast(device_type, dtype=dtype):
                return self._forward(sample)
        return self._forward(sample)

    def _forward(self, sample):
        ds = sample["dataset_name"]
        task = self.task_type(ds)
        head = self.heads[task][ds]
        # This batch's dataset conditions the shared layers (model.conditioning): one z per forward,
        # so micro-batches of several tasks (training.tasks_per_step) each use their own.
        ctx = None if self.conditioning is None else self.conditioning.context(ds)
        medusa = None if self.medusa is None else self.medusa.context(ds)
        moe_task = None if self.moe_task_embeddings is None else self.moe_task_embeddings[ds].weight[0]
        moes = self._moe_layers()
        for _, m in moes:  # a layer this batch does not run (another dataset's decoder) reports nothing
            m.last = None
        text_src = text_mask = text_pos = None
        if task in ("vl", "glue"):
            with contextlib.nullcontext() if ctx is None else self.conditioning.bert_context(ctx):
                text_src, text_pos = self.forward_bert_with_task_idx(sample, head.get("task_idx"), ds)
            text_src, text_pos = self.bert_projection(text_src), self.bert_pos_projection(text_pos)
            text_mask = sample["input_mask"]
            if self.keep_only_cls[ds]:  # the CLS token only
                text_src, text_pos, text_mask = text_src[:, :1], text_pos[:1], text_mask[:, :1]
            if ctx is not None:
                text_src = ctx.film_text(text_src)  # (B, L, d_dec); FiLM is elementwise: after the CLS cut
        img_src = sample["image"] if task in ("vl", "detection") else None
        out = self.unit_base_model(img_src, text_src, text_mask, text_pos, task_type=task, dataset_name=ds,
                                   task_idx=head.get("task_idx"), conditioning=ctx, moe_task=moe_task,
                                   medusa=medusa)
        if task == "detection":
            out = self._detection(out["hidden_states"], sample, ds)
        else:
            out = self._classification(out["hidden_states"], sample, task, ds)
        if moes and "losses" in out:
            out["losses"].update(self._moe_losses(moes, f"{sample.get('dataset_type', 'train')}/{ds}"))
        return out

    # -- mixture of experts (model.moe) ----------------------------------------------------------

    def _moe_layers(self):
        """``[(module path, MoEFFN)]`` of the model (a shared decoder's once); empty with moe off."""
        if self._moe is None:
            return []
        return [(n, m) for n, m in self.named_modules() if isinstance(m, MoEFFN)]

    @staticmethod
    def _moe_losses(moes, prefix):
        """``{"{prefix}/loss_moe_<name>": ()}``: each auxiliary loss summed over the MoE layers that ran."""
        total = {}
        for _, m in moes:
            for name, value in (m.last or {"losses": {}})["losses"].items():
                total[name] = total[name] + value if name in total else value
        return {f"{prefix}/{name}": value for name, value in total.items()}

    def moe_usage(self):
        """``{MoE layer path: (E,) int64}``: the slots each expert ran (after capacity; padding
        excluded) in the last forward, for the layers it ran (``model.moe``; ``{}`` when off).
        The tensors stay on the model's device: reading them is a host sync."""
        return {n: m.last["usage"] for n, m in self._moe_layers() if m.last is not None}

    def _detection(self, hs, sample, ds):
        split = sample.get("dataset_type", "train")
        logits = self.class_embeds[ds](hs)  # (dec_layers, B, Q, C + 1)
        boxes = self.bbox_embeds[ds](hs).sigmoid()  # (dec_layers, B, Q, 4): normalised cxcywh
        out = {"hidden_states": hs, "pred_logits": logits[-1], "pred_boxes": boxes[-1], "hs_for_attr": hs[-1]}
        if split != "test":
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b, "hs_for_attr": h}
                                  for a, b, h in zip(logits[:-1], boxes[:-1], hs[:-1])]
            if sample.get("targets") is not None:
                crit = self.det_losses[ds]
                loss_dict = crit(out, sample["targets"])
                weight = self.detection_loss_weight
                out["losses"] = {f"{split}/{ds}/{k}": loss_dict[k] * w * weight
                                 for k, w in crit.weight_dict.items() if k in loss_dict}
        head = self.det_losses[ds].attribute_head
        if head is not None and self.predict_attributes:
            labels = logits[-1][..., :-1].argmax(-1)  # the most likely real class per query
            out["attr_logits"] = head(hs[-1], labels)
        return out

    def _classification(self, hs, sample, task, ds):
        split = sample.get("dataset_type", "train")
        num_queries = self.unit_base_model.num_queries[task][ds]
        layers = hs if self.loss_on_all_hs else hs[-1:]
        losses = {}
        scores = None
        head = self.heads[task][ds]
        for idx, layer_hs in enumerate(layers):
            pooled = self.dropout(layer_hs[:, -num_queries, :])  # query 0: (B, d_dec)
            scores = self.classifiers[task][ds](pooled)  # (B, num_labels)
            targets = sample.get("targets")
            if targets is not None:
                loss = self.kinds[ds].loss(scores, targets, head)  # the kind's: vqa is MMF's logit_bce
                losses[f"{split}/{ds}/loss_{idx}"] = loss
        out = {"scores": scores}
        if losses:
            out["losses"] = losses
        return out


def build_model(cfg, trust=False):
    """``UniT`` from a loaded config (``unit_fast.load_config``); with ``model.base_ckpt_path``
    set, the base model (or only its backbone, ``base_ckpt_load_backbone_only``) starts from
    that local DETR / UniT checkpoint, as MMF's ``build`` does.  Checkpoint and backbone weight
    files are read weights-only; ``trust=True`` unpickles them fully (files you trust only)."""
    from unit_fast.checkpoint_io import trusting
    from unit_fast.models.checkpoint import load_base_checkpoint

    mcfg = cfg["model"] if "model" in cfg else cfg
    with trusting(trust):  # the backbone reads model.base_args.backbone_weights while it is built
        model = UniT(mcfg)
    if mcfg.get("base_ckpt_path"):
        report = load_base_checkpoint(model, mcfg["base_ckpt_path"],
                                      mcfg.get("base_ckpt_load_backbone_only", False), trust=trust)
        if report.unexpected or (report.missing and mcfg.get("base_ckpt_load_backbone_only", False)):
            raise RuntimeError(f"base checkpoint does not fit the model:\n{report}")
    return model
