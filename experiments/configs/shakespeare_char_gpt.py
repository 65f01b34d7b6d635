"""Character GPT on Tiny Shakespeare at nanoGPT's CPU size.

4 layers, 4 heads, width 128, context 64 (about 0.8M parameters). nanoGPT
reports a validation loss of about 1.88 for this configuration on a laptop
CPU. Target: validation loss <= 1.90 within 10 minutes on a 2-core CPU.

The corpus path comes from ``--config.data_path`` or the environment variable
``NNLIB_TINYSHAKESPEARE`` (the loader can also download it when online).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.dataset = "shakespeare_char"
    c.data_path = ""
    c.model = ml_collections.ConfigDict(
        {"name": "gpt", "context_length": 64, "num_layers": 4, "num_heads": 4,
         "embed_dim": 128, "dropout_rate": 0.0})
    c.optimizer = "adamw"
    c.learning_rate = 1e-3
    c.schedule = "warmup_cosine"
    c.warmup_steps = 100
    c.end_learning_rate = 1e-4
    c.weight_decay = 0.1
    c.clip_norm = 1.0
    c.batch_size = 12
    c.num_epochs = 0
    c.num_steps = 2500
    c.train_stride = 1
    c.max_val_windows = 2048
    c.eval_batch_size = 256
    c.log_every = 100
    c.eval_every = 500
    c.checkpoint_every = 1000
    c.seed = 0
    return c
