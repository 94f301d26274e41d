# Fine-tune a trained checkpoint on another corpus: the weights come from the checkpoint, the
# optimizer and step start fresh, and early stopping keeps the best validation loss.
#   python prepare.py --name=mycode --input=~/src/myproject   # your own text
#   python train.py config/finetune.py
init_from = "out/best.pt"   # the pretrained checkpoint (its architecture is used)
out_dir = "out-finetune"
dataset = "mycode"
optimizer = "adamw"          # tuned with AdamW and a cosine (train.py's defaults: Muon + WSD, for the quickstart)
lr_schedule = "cosine"
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 20
max_iters = 500
eval_interval = 50
patience = 4                # stop after 4 evaluations without improvement
