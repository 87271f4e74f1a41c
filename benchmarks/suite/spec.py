"""What the strategy suite is: the strategies it runs, the epochs per label fraction, the data
pool, the CPU target and the published figures it is compared with.

Owns: these constants only. Must not: read or write anything.
"""

from __future__ import annotations

STRATEGIES = ["linear_probe", "full_ft", "freeze_unfreeze", "gradual", "lp_ft", "layer_decay", "regularized", "scratch"]
BASELINE = "scratch"  # the same architecture from random init, same budget
# Epochs per label fraction: fewer images get more passes (the budget grows with the data).
DEFAULT_EPOCHS = {0.01: 15, 0.1: 4, 1.0: 2}
TRAIN_POOL = 58_000  # Fashion-MNIST's 60,000 training images minus the 2,000 held out for validation
TARGET_ACC, TARGET_MINUTES = 90.0, 20.0  # the CPU target: >= 90% test accuracy within 20 min per run
# Published Fashion-MNIST test accuracies (zalandoresearch/fashion-mnist README benchmark table;
# see ../shared/anchors.md): all trained on the 60,000 images, on GPUs, for many epochs.
ANCHORS = [
    ("2 conv + pooling (TensorFlow tutorial)", 91.6),
    ("2 conv + 2 FC, random flips", 93.9),
    ("CNN with shortcuts, augmentation + random erasing", 94.7),
    ("DenseNet-BC, 768K params, standard augmentation", 95.4),
    ("WRN-40-4, 8.9M params, standard augmentation", 96.7),
]
