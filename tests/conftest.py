import torch

# Tiny models: one thread avoids oversubscribing the 2-core CI machines (OpenMP spin-waits dominate otherwise).
torch.set_num_threads(1)
