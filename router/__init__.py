"""`kubellm route`: an OpenAI-compatible router in front of one model's replicas.

No torch and nothing of the runtime's: it runs in the operator's image."""
