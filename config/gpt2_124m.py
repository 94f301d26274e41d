# GPT-2 small (124M) on FineWeb-Edu sample-10BT (~10B GPT-2 tokens of educational web pages), on 8 GPUs
# with DDP: nanoGPT's recipe and batch, for one pass over the sample.
#   pip install datasets
#   python prepare.py --name=fineweb_edu --hf_dataset=HuggingFaceFW/fineweb-edu --hf_config=sample-10BT \
#                     --tokenizer=gpt2 --val_docs=10000
#   torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py
# prepare.py streams the dataset (nothing is downloaded ahead) and writes ~20 GB of uint16 ids; validation
# is every 20th of the first 200,000 documents (--val_docs=10000, ~10M tokens). Any corpus prepared with
# --tokenizer=gpt2 works the same, e.g. OpenWebText as .jsonl: --input=owt/*.jsonl.
# global batch = 12 sequences x 1024 tokens x 5 micro-steps x 8 GPUs = 491,520 tokens per step;
# 20,000 steps = 9.8B tokens, about one pass over sample-10BT.
out_dir = "out-gpt2-124m"
dataset = "fineweb_edu"
model = "gpt2"
pad_vocab_to = 64           # gpt2's 50257 ids -> 50304 rows: faster matmuls, the extra rows never used
block_size = 1024
batch_size = 12
gradient_accumulation_steps = 5  # per rank
max_iters = 20000
lr_decay_iters = 20000
optimizer = "adamw"          # tuned with AdamW and a cosine (train.py's defaults: Muon + WSD, for the quickstart)
lr_schedule = "cosine"
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 700
weight_decay = 0.1
beta2 = 0.95
eval_interval = 1000
eval_iters = 25             # per rank: 25 x 8 x 12 fixed windows of 1024 tokens, ~2.5M tokens
log_interval = 10
parallel = "ddp"
