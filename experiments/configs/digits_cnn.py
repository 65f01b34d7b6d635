"""CNN on scikit-learn's 8x8 digits. Target: >= 98.5% test accuracy in <= 2 min."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.dataset = "digits"
    c.model = ml_collections.ConfigDict(
        {"name": "cnn", "features": (32, 64), "hidden_sizes": (128,), "dropout_rate": 0.3})
    c.optimizer = "adamw"
    c.learning_rate = 2e-3
    c.schedule = "warmup_cosine"
    c.warmup_steps = 50
    c.weight_decay = 1e-4
    c.batch_size = 64
    c.num_epochs = 80
    c.num_steps = 0
    c.log_every = 100
    c.eval_every = 100
    c.checkpoint_every = 500
    c.seed = 0
    return c
