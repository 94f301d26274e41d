# Fine-tune the span-pretrained encoder-decoder on the built-in summarisation task (no download; prepared on
# first use): a stdlib function's source without its docstring -> the docstring's first sentence, e.g.
# `def subtract(self, a, b): ...` -> `Return the difference between the two operands.` Sources of at most 511
# bytes (cut to their first 191 here), targets of at most 95; split by file like pystdlib. Scored by ROUGE-L
# (pip install rouge-score); the function's name as words scores 20, the source's first line 19.
#   python train.py config/t5_span.py                  # pretrain: out-t5-span/best.pt
#   python train.py config/t5_docstrings.py            # fine-tune it
#   python train.py config/t5_docstrings.py --init_from=scratch --out_dir=out-t5-doc-scratch   # baseline
#   python finetune_grid.py --task=docstrings          # both, on 1/10/100% of the pairs, 3 seeds: one table
#   python sample.py --ckpt=out-t5-docstrings --exact_match=val     # ROUGE and exact match, next to the baselines
objective = "seq2seq"
init_from = "out-t5-span/best.pt"
model = "t5-tiny"           # the architecture with --init_from=scratch (otherwise the checkpoint's)
dataset = "stdlib_docstrings"
out_dir = "out-t5-docstrings"
seq_len = 192               # sources cut to their first 191 bytes (and EOS): the header and the first lines
dec_len = 96                # every target (at most 95 bytes) and its EOS
batch_size = 16
max_iters = 200             # the grid's budget: ~1.5 minutes on one core
eval_interval = 100
eval_iters = 8              # 8 x 16 = 128 rows: the whole validation split
eval_rouge = 1000           # ROUGE of greedy outputs for every validation pair at each evaluation
optimizer = "adamw"
lr_schedule = "cosine"
learning_rate = 5e-4        # the same for --init_from=scratch; 2e-3 overfits the 10% subset by step 200
min_lr = 5e-5
warmup_iters = 20
