# BERT-base pretraining with the recipe of Devlin et al. (2018): masked LM + next sentence prediction,
# 256 sequences per step for 1M steps, Adam(W) lr 1e-4 with beta2 0.999, weight decay 0.01, 10k warmup
# steps, dropout 0.1. Sequences are 128 tokens for the first 90% of the steps and 512 for the last 10%:
# attention is quadratic in length, so the short phase is cheap, and the long phase then trains the
# position embeddings past 128. The model's position table always has 512 rows (block_size).
# (The paper decays the learning rate linearly to 0; train.py decays on a cosine to min_lr.)
#
# Data: English Wikipedia (BERT's BooksCorpus is not public), one article per document, so NSP pairs never
# straddle two; GPT-2's BPE (a tokenizer.json works too, e.g. BERT's own WordPiece):
#   pip install datasets
#   python prepare.py --name=wiki --hf_dataset=wikimedia/wikipedia --hf_config=20231101.en --tokenizer=gpt2 \
#                     --val_docs=10000
# Phase 1, sequence 128, steps 0 -> 900k, 8 GPUs (32 sequences each):
#   torchrun --standalone --nproc_per_node=8 train.py config/bert_base.py
# Phase 2, sequence 512, steps 900k -> 1M: resume the same run with longer sequences, same global batch:
#   torchrun --standalone --nproc_per_node=8 train.py config/bert_base.py --init_from=resume --seq_len=512 \
#            --max_iters=1000000
# Then fine-tune on a labelled task: see config/finetune_classify.py.
out_dir = "out-bert-base"
objective = "mlm_nsp"
dataset = "wiki"
model = "bert-base"
pad_vocab_to = 64           # gpt2's 50257 + [CLS] [SEP] [MASK] [PAD] = 50261 -> 50304 rows: faster matmuls
seq_len = 128               # phase 2: 512
batch_size = 32             # per GPU; x 8 GPUs = 256 sequences per step
gradient_accumulation_steps = 1
max_iters = 900000          # phase 1 ends here; phase 2 runs on to 1,000,000
lr_decay_iters = 1000000    # one schedule across both phases
optimizer = "adamw"          # tuned with AdamW and a cosine (train.py's defaults: Muon + WSD, for the quickstart)
lr_schedule = "cosine"
learning_rate = 1e-4
min_lr = 1e-5
warmup_iters = 10000
weight_decay = 0.01
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0
dropout = 0.1
eval_interval = 5000
eval_iters = 50
log_interval = 100
parallel = "ddp"            # bert-base fits any modern GPU; 'fsdp' for bert-large on small ones
