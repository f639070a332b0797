"""Models: files, tokenizer, sampling, generated weights and the session that runs them.

gguf        model files (metadata, tensors, dequantization)
tokenizer   sentencepiece built from a GGUF vocabulary
sampling    llama.cpp's sampler chain
weights     generated ("dummy") weights of any shape
packaged    models by name (the real Gemma 3 270M)
session     KV caches, prefill, decode and generation through cached executors
perplexity  llama-perplexity's scoring
"""
