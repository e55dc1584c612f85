"""The classify family, FedPFT and its baselines: text classification with a foundation model (FM) that clients
tune through LoRA on the full FM, a pruned and aligned sub-FM, or an offsite-tuning emulator.

Device side: data, classifier models, the base store, compression (FFN discovery, APoZ), the device task. Server
side: alignment, the emulator, evaluation and the strategies.
"""
