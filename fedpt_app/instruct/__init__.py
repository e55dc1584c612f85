"""The instruct family, FedPT and its baselines: instruction tuning of a same-tokenizer causal-LM pair.

Device side: data, prompts, the built-in set, the device task. Server side: decoding, proxy-tuning, distillation,
evaluation and the strategies. The tiny preset builder serves both.
"""
