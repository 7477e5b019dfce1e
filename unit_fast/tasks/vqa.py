"""The ``vqa`` task kind: VQAv2's question and annotation files, a soft-score answer head
trained with MMF's ``logit_bce``, the official VQA accuracy."""

import math

import torch
import torch.nn.functional as F

from unit_fast.tasks.detection import image_sizes_entry
from unit_fast.tasks.kind import TaskKind, register_task_kind


def need_tokenizer(ctx, ds, kind):
    if ctx.tokenizer is None:
        raise ValueError(f"data.datasets.{ds} (kind {kind}) has text, and no tokenizer is configured: set "
                         "data.tokenizer (a vocab.txt or a tokenizer folder) or model.bert.pretrained (a local "
                         "BERT folder)")
    return ctx.tokenizer


class VQAKind(TaskKind):
    name = "vqa"
    model_task = "vl"
    path_keys = ("questions", "annotations", "images")
    options = {"answer_vocab": None}  # a file (one answer per line) or a list; null: top 3129 of train
    text_length = 25  # MMF projects/unit/configs/vqa2_dataset_cfg.yaml
    keep_only_cls = False
    head_defaults = {"num_labels": None, "loss_type": "bce"}
    head_keys = frozenset({"kind", "task_idx", "task_token", "num_labels", "loss_type"})
    predict_inputs = (("image", "question"), ())

    def read(self, ctx, ds, split, paths):
        from unit_fast.data.datasets import VQADataset
        from unit_fast.data.readers.vqa2 import read_vqa2

        tokenizer = need_tokenizer(ctx, ds, self.name)
        recs, vocab = read_vqa2(paths["questions"], paths["annotations"], paths["images"],
                                answer_vocab=ctx.info.get("answers") or ctx.options["answer_vocab"],
                                dense_scores=False, on_error=ctx.on_error, report=ctx.report)
        ctx.info.setdefault("answers", list(vocab))  # train's (or the configured file's) for val too
        return VQADataset(recs, ds, tokenizer, max_length=ctx.text_length, answer_vocab=ctx.info["answers"],
                          sizes=ctx.sizes)

    def fit_head(self, ds, head, info, model_cfg=None):
        if info.get("answers") is not None:  # the vocabulary is the head: its size always wins
            head["num_labels"] = len(info["answers"])

    def loss(self, scores, targets, head):
        # MMF's logit_bce: the mean BCE over (B, A) times A, i.e. summed over answers.
        loss = F.binary_cross_entropy_with_logits(scores, targets.to(scores.dtype))
        return loss * targets.shape[1]

    def probabilities(self, logits, head):
        return logits.sigmoid()  # trained with BCE: independent answer scores

    def uncertainty(self, out, head):
        """``(B,)``: the entropy of the answer scores normalised to a distribution (sigmoid
        scores over their sum), / log A: 0 when one answer holds all the mass, 1 when all are
        alike."""
        s = out["scores"].float().sigmoid()  # (B, A)
        q = s / s.sum(-1, keepdim=True)
        return -(q * q.clamp_min(1e-12).log()).sum(-1) / math.log(max(2, s.shape[-1]))

    def evaluator(self, ds, dataset, info):
        from unit_fast.evaluation import VQAEvaluator

        return VQAEvaluator(info["answers"])

    def eval_update(self, ev, out, batch, dataset):
        ev.update(out["scores"].float().cpu(), [dataset.records[i] for i in batch["indices"]])

    def chance(self, summary_entry):
        return (summary_entry or {}).get("chance", {}).get("majority_answer_accuracy")

    def metadata(self, ds, dataset, info):
        answers = info.get("answers")
        return {"image_sizes": image_sizes_entry(dataset), "max_length": int(dataset.max_length),
                "answers": None if answers is None else list(answers)}

    def predict_dataset(self, ds, entry, inputs, tokenizer, sizes):
        from unit_fast.data import datasets as D
        from unit_fast.data import records as R

        if not entry.get("answers"):
            raise ValueError(f"checkpoint metadata has no VQA answer vocabulary for {ds}")
        rec = R.VQARecord(inputs["image"], 0, 0, inputs["question"], answers=[])
        return D.VQADataset([rec], ds, tokenizer, max_length=entry["max_length"], answer_vocab=entry["answers"],
                            sizes=sizes)

    def predict_result(self, ds, out, entry, head, size, options):
        """The ``top_k`` answers by sigmoid score."""
        probs = self.probabilities(out["scores"][0].float().cpu(), head)
        answers = entry["answers"]
        if len(answers) != len(probs):
            raise ValueError(f"{len(answers)} answers in the metadata for a head of {len(probs)} labels")
        top = torch.topk(probs, min(options.get("top_k", 5), len(probs)))
        ranked = [{"answer": answers[i], "score": float(p)}
                  for p, i in zip(top.values, top.indices.tolist(), strict=True)]
        return {"dataset": ds, "kind": self.name, "task": self.model_task, "answer": ranked[0]["answer"],
                "score": ranked[0]["score"], "top": ranked}

    def format_result(self, r, inputs):
        top = ", ".join(f"{a['answer']} {a['score']:.3f}" for a in r["top"])
        return f"{r['dataset']}: answer {r['answer']!r} (score {r['score']:.3f})\n  top: {top}"


VQA = register_task_kind(VQAKind())
