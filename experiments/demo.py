"""The demo: an MLP from ``nnlib.layers`` learns scikit-learn's 8x8 digits.

Needs no download (the digits ship with scikit-learn). Run with ``make demo``.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from nnlib.layers import MLP


def main(epochs: int = 40, batch_size: int = 64, seed: int = 0) -> float:
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # [1797, 64], pixels in [0, 1]
    y = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=seed
    )

    model = MLP(hidden_sizes=(256, 128), out_features=10, dropout_rate=0.1)
    init_key, dropout_key, shuffle_key = jax.random.split(jax.random.key(seed), 3)
    params = model.init(init_key, x_train[:1])["params"]
    optimizer = optax.adamw(1e-3, weight_decay=1e-4)
    opt_state = optimizer.init(params)
    num_params = sum(p.size for p in jax.tree.leaves(params))

    def loss_fn(params, xb, yb, key):
        logits = model.apply({"params": params}, xb, train=True, rngs={"dropout": key})
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    @jax.jit
    def train_step(params, opt_state, xb, yb, step):
        key = jax.random.fold_in(dropout_key, step)
        loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def accuracy(params, xb, yb):
        return jnp.mean(jnp.argmax(model.apply({"params": params}, xb), -1) == yb)

    steps_per_epoch = len(x_train) // batch_size
    print(f"MLP 64-256-128-10 ({num_params:,} parameters) on {len(x_train)} digits")
    start = time.perf_counter()
    step = 0
    for epoch in range(epochs):
        order = np.asarray(jax.random.permutation(jax.random.fold_in(shuffle_key, epoch),
                                                  len(x_train)))
        for i in range(steps_per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            params, opt_state, loss = train_step(params, opt_state, x_train[idx],
                                                 y_train[idx], step)
            step += 1
        if (epoch + 1) % 10 == 0:
            acc = float(accuracy(params, x_test, y_test))
            print(f"epoch {epoch + 1:3d}  loss {float(loss):.4f}  test accuracy {acc:.4f}")
    elapsed = time.perf_counter() - start
    test_accuracy = float(accuracy(params, x_test, y_test))
    print(f"test accuracy {test_accuracy:.4f} after {step} steps in {elapsed:.1f} s "
          f"({step / elapsed:.0f} steps/s)")
    return test_accuracy


if __name__ == "__main__":
    main()
