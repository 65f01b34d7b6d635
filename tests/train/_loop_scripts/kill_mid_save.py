"""Child process: saves checkpoint 1, then dies by SIGKILL in the middle of
saving checkpoint 2 — after every file is written, just before orbax's atomic
rename of ``2.orbax-checkpoint-tmp*`` to ``2`` (the worst possible moment).

``python kill_mid_save.py DIRECTORY``; never returns normally.
"""

import os
import signal
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from orbax.checkpoint._src.path import atomicity  # noqa: E402

from nnlib.layers import MLP  # noqa: E402
from nnlib.train.checkpoint import Checkpointer  # noqa: E402
from nnlib.train.optim import make_optimizer  # noqa: E402
from nnlib.train.state import TrainState  # noqa: E402

state = TrainState.create(model=MLP((8,), 3), tx=make_optimizer("momentum", 0.1),
                          key=jax.random.key(0), example_input=jnp.zeros((1, 4)))
checkpointer = Checkpointer(sys.argv[1], keep=3)
checkpointer.save(state.replace(step=jnp.int32(1)), metadata={"epoch": 1})

finalize = atomicity.AtomicRenameTemporaryPath.finalize


async def die_before_step_rename(self):
    if self._final_path.name == "2":  # the step directory, not an item inside it
        os.kill(os.getpid(), signal.SIGKILL)
    await finalize(self)


atomicity.AtomicRenameTemporaryPath.finalize = die_before_step_rename
checkpointer.save(state.replace(step=jnp.int32(2)), metadata={"epoch": 2})
sys.exit("unreachable: the save should have been killed")
