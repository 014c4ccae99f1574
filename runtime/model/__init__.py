"""The model: our Llama-family implementation and the loaders that fill its weights."""
