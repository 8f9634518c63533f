"""Building blocks and models: attention kernels and masks, positions, norms, KV caches, the attention
layer, blocks, the decoder LM and the classifier, LoRA."""
