# Fine-tune the span-pretrained encoder-decoder on the built-in demo task (no download; prepared on first
# use): given the header of a stdlib function, write its parameter names, `def get(self, key, default=None):`
# -> `self key default`. Functions of 2+ parameters, headers of at most 63 bytes, split by file like
# pystdlib; no answer is a part of its source, so copying scores 0 (exact match; ROUGE-L 62 for copying it).
#   python train.py config/t5_span.py                  # pretrain: out-t5-span/best.pt
#   python train.py config/t5_seq2seq.py               # fine-tune it
#   python train.py config/t5_seq2seq.py --init_from=scratch --out_dir=out-t5-scratch   # baseline
#   python finetune_grid.py --task=params              # both, on 1/10/100% of the pairs, 3 seeds: one table
#   python sample.py --ckpt=out-t5-seq2seq --exact_match=val     # exact match and ROUGE, next to the copy baselines
#   python sample.py --ckpt=out-t5-seq2seq --source="def get(self, key, default=None):"
# Your own task: a .jsonl of {"source": ..., "target": ...} lines (every 20th goes to validation):
#   python prepare.py --seq2seq --name=mytask --input=pairs.jsonl   # then --dataset=mytask
objective = "seq2seq"
init_from = "out-t5-span/best.pt"
model = "t5-tiny"           # the architecture with --init_from=scratch (otherwise the checkpoint's)
dataset = "stdlib_params"
out_dir = "out-t5-seq2seq"
seq_len = 64                # every header and its EOS fit; the decoder gets 64 too (dec_len=0)
batch_size = 32
max_iters = 300             # the grid's budget: ~1.5 minutes on one core
eval_interval = 100
eval_iters = 7              # 7 x 32 = 224 rows: the whole validation split (215 headers)
eval_rouge = 1000           # exact match and ROUGE of greedy outputs for every validation header at each evaluation
optimizer = "adamw"
lr_schedule = "cosine"
learning_rate = 2e-3        # the same for --init_from=scratch
min_lr = 2e-4
warmup_iters = 30
