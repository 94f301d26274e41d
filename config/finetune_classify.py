# Fine-tune a pretrained BERT encoder as a classifier: a new head (n_labels classes) on the pooled [CLS]
# output; the MLM and NSP heads are dropped, everything else starts from the checkpoint. The built-in
# demo task (no download): from which of the stdlib packages of 5+ files (19 on Python 3.11) does a
# 126-byte snippet come (json/decoder.py -> json), split by file like pystdlib; prepared on first use.
#   python train.py config/bert_quickstart.py                  # pretrain: out-bert/best.pt
#   python train.py config/finetune_classify.py                # fine-tune it
#   python train.py config/finetune_classify.py --init_from=scratch --out_dir=out-classify-scratch   # baseline
#   python finetune_grid.py                                    # both, on 1/10/100% of the labels, 3 seeds: one table
#   python sample.py --ckpt=out-classify --start=FILE:some_snippet.py    # the most likely labels
# Your own task: a .jsonl of {"text": ..., "label": ...} lines (every 20th goes to validation):
#   python prepare.py --classify --name=mytask --input=labelled.jsonl   # then --dataset=mytask
objective = "classify"
init_from = "out-bert/best.pt"
model = "bert-tiny"         # the architecture with --init_from=scratch (otherwise the checkpoint's)
dataset = "stdlib_modules"
out_dir = "out-classify"
seq_len = 128               # as pretrained: [CLS], the snippet's 126 bytes, [SEP]
batch_size = 8              # at equal compute, 4x the steps of batch 32: the run is short, steps count more
max_iters = 600
eval_interval = 100
eval_iters = 263            # 263 x 8 rows: the whole validation split (2,102 snippets on Python 3.11)
optimizer = "adamw"          # tuned with AdamW and a cosine (train.py's defaults: Muon + WSD, for the quickstart)
lr_schedule = "cosine"
learning_rate = 3e-4          # small, as BERT fine-tunes (the same for --init_from=scratch)
head_lr_mult = 30.0           # pooler + new classifier at 9e-3: at 3e-4 they could not grow in 600 steps (36%)
min_lr = 3e-5
warmup_iters = 60
weight_decay = 0.01
dropout = 0.1
patience = 0
