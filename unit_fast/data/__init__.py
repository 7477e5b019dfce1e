"""Data: readers for the real dataset formats, the synthetic default, image decoding (DALI,
torchvision, PIL) with DETR's transforms, and the datasets / collator that make UniT batches.

  records.py     what readers return (DetectionRecord, VQARecord, EntailmentRecord, TextRecord)
  readers/       COCO / Visual Genome detection, VQAv2, SNLI-VE, GLUE (QNLI, MNLI, QQP, SST-2)
  text.py        BERT tokenizer from local files; MMF's token layout
  synthetic.py   the embedded default: python -m unit_fast.data.synthetic --out DIR
  transforms.py  DETR's train / test transforms as per-sample plans
  decode.py      image decoding backends executing the plans
  collate.py     padded image batches + masks; aspect-ratio bucketing
  datasets.py    datasets over records and the batch collator
"""
