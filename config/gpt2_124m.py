# GPT-2 small (124M) on an OpenWebText-like corpus, nanoGPT's recipe, on 8 GPUs with DDP:
#   python prepare.py --name=openwebtext --input=owt/*.jsonl --tokenizer=gpt2
#   torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py
# global batch = 12 sequences x 1024 tokens x 5 micro-steps x 8 GPUs = ~0.5M tokens per step
out_dir = "out-gpt2-124m"
dataset = "openwebtext"
model = "gpt2"
vocab_size = 50304          # 50257 padded up to a multiple of 64: faster matmuls, the extra rows never used
block_size = 1024
batch_size = 12
gradient_accumulation_steps = 5  # per rank
max_iters = 600000
lr_decay_iters = 600000
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 2000
weight_decay = 0.1
beta2 = 0.95
eval_interval = 1000
eval_iters = 200
log_interval = 10
parallel = "ddp"
