"""Serving: the large model's logits service and its remote provider (`serve-logits`), and the OpenAI-compatible
API of a tuned run (`serve`)."""
