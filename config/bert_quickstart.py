# BERT-style pretraining on a CPU in minutes: masked LM + next sentence prediction (L = L_MLM + L_NSP)
# with the bert-tiny encoder (4 layers, 128 wide, post-LN, bidirectional) on the built-in pystdlib
# corpus (bytes; prepared on first use). Pairs are [CLS] A [SEP] B [SEP] of 128 bytes (BERT's first
# phase), cut at line boundaries; half have B from another file (NotNext); 15% of the bytes are chosen
# for MLM, of those 80% become [MASK], 10% a random byte, 10% stay.
#   python train.py config/bert_quickstart.py
#   python sample.py --ckpt=out-bert/best.pt --start=$'import os\nimport s[MASK][MASK]\n'  # fill in the masks
#   python train.py config/finetune_classify.py       # then fine-tune the encoder as a classifier
out_dir = "out-bert"
objective = "mlm_nsp"
dataset = "pystdlib"
tokenizer = "bytes"
model = "bert-tiny"
batch_size = 16             # at equal tokens, 16 x 2000 steps beat 32 x 1000: MLM acc 0.49 vs 0.42, NSP equal
seq_len = 128               # of bert-tiny's 256 positions; config/finetune_classify.py uses the same 128
max_iters = 6000            # Muon + WSD: MLM accuracy 74% (2000 AdamW + cosine steps: 49%)
optimizer = "auto"          # Muon on the blocks' matrices at muon_lr 0.01, AdamW on the rest (AdamW before torch 2.9)
lr_schedule = "wsd"
learning_rate = 2e-3
min_lr = 0.0
warmup_iters = 100
weight_decay = 0.01
eval_interval = 1000
eval_iters = 32             # 32 x 16 fixed validation pairs
log_interval = 50
device = "auto"
